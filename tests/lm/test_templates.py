"""Prompt templates: each written once, each checked against the exact text its source produces."""

from __future__ import annotations

from llmrepro.lm.templates import alpaca_prompt
from llmrepro.lm.templates import dolly_prompt as format_prompt


def test_dolly_template():
    assert format_prompt("Name a city.", "Paris.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a city.\n\n### Response:\nParis.\n\n### End")
    # dolly's consts.py: INPUT_KEY = "Input:", without the "### " of the other keys
    assert format_prompt("Q", "A", "Some context.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ\n\nInput:\nSome context.\n\n### Response:\nA\n\n### End")


def test_alpaca_prompt_with_and_without_input():
    assert alpaca_prompt("Add.", "1 and 2", "3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n"
        "### Response:\n3")
    assert alpaca_prompt("Add.", "", "3") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Response:\n3")
