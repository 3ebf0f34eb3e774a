"""Prompt templates, each written once: the Tulu chat template, the Alpaca prompt and the Dolly training prompt.

- `TULU_CHAT_TEMPLATE`: open-instruct's Tulu format (`<|user|>\\n...\\n<|assistant|>\\n...EOS\\n`), given to
  the tiny models and to tokenizers without a chat template.
- `alpaca_prompt`: the Stanford Alpaca prompt (with or without an input), the `text` column of tatsu-lab/alpaca.
- `dolly_prompt`: the training text of databricks' Dolly trainer (`training/consts.py` there).
"""

from __future__ import annotations

TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

ALPACA_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.")
ALPACA_INTRO_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                           "further context. Write a response that appropriately completes the request.")


def alpaca_prompt(instruction: str, input: str, response: str) -> str:
    """The Alpaca training text: intro, `### Instruction:`, optional `### Input:`, `### Response:`."""
    if input:
        return (f"{ALPACA_INTRO_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                f"### Response:\n{response}")
    return f"{ALPACA_INTRO}\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"


# Dolly (databrickslabs/dolly training/consts.py)
DOLLY_INTRO = ALPACA_INTRO
INSTRUCTION_KEY, INPUT_KEY, RESPONSE_KEY, END_KEY = "### Instruction:", "### Input:", "### Response:", "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"


def dolly_prompt(instruction: str, response: str, context: str = "") -> str:
    """The Dolly training text: intro, instruction, optional input, response, end key."""
    parts = [DOLLY_INTRO, f"{INSTRUCTION_KEY}\n{instruction}"]
    if context:
        parts.append(f"{INPUT_KEY}\n{context}")
    parts.append(f"{RESPONSE_KEY_NL}{response}")
    parts.append(END_KEY)
    return "\n\n".join(parts)


MARKUP = ["<|user|>\n", "<|assistant|>\n", "<|system|>\n", INSTRUCTION_KEY + "\n", INPUT_KEY + "\n",
          RESPONSE_KEY_NL, END_KEY, ALPACA_INTRO, ALPACA_INTRO_WITH_INPUT]
