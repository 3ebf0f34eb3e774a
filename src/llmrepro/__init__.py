"""llmrepro: named, validated, one-command reproductions of five LLM research codebases."""

__version__ = "0.1.0"
