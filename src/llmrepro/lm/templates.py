"""Prompt templates, each written once: the Tulu chat template, the Alpaca prompt and the Dolly training prompt.

- `TULU_CHAT_TEMPLATE`: a Tulu-style format (`<|user|>\\n...\\n<|assistant|>\\n...EOS\\n`), given to the tiny
  models and to tokenizers without a chat template. It puts `\\n` after every EOS, also the last one.
- `OPEN_INSTRUCT_TULU_TEMPLATE`: open-instruct's `CHAT_TEMPLATES["tulu"]` exactly (allenai/open-instruct
  `open_instruct/dataset_processor.py` @ 5fd117a): no `\\n` after the EOS of the last assistant message. The
  gradient-similarity source forced it onto its tokenizer; its recipes force it too (`chat_template: tulu`).
- `GDR_OLMO_TEMPLATE`: the template the gradient-projection source forced onto OLMo-2's tokenizer
  (`olmo_training_utils.py` @ d73147d): `    <|user|> ...\n` / `    <|assistant|> ...\n`, no BOS or EOS.
- `LLAMA2_NO_BOS_TEMPLATE`, `OPT_SEP_TEMPLATE`: the memory-efficiency source's per-model templates
  (MikkelGodsk/Masters-thesis `src/model_factories.py` @ b51c7f1): Llama-2's `[INST] q [/INST] a </s>` without
  the BOS (the tokenizer adds it), OPT's `q <SEP>a </s>`; `COMPLETION_MARKERS` are the strings its
  completion-only collator searched for (instruction, response).
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

OPEN_INSTRUCT_TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' and not loop.last %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
# transformers 4.38's Llama-2 default chat template (no default system prompt) with its `bos_token + ` removed,
# as the memory-efficiency source did: `[INST] {user} [/INST] {assistant} </s>`, a system message folded into
# the first user turn between <<SYS>> markers; the tokenizer adds the one BOS.
LLAMA2_NO_BOS_TEMPLATE = (
    "{% set ns = namespace(system=none) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}"
    "{% elif message['role'] == 'user' %}"
    "{% set text = message['content'] if ns.system is none "
    "else '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' + message['content'] %}{% set ns.system = none %}"
    "{{ '[INST] ' + text.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
# The source's OPT template (`src/chat_templates/new_opt_chat_template.py`): `{user} <SEP>{assistant} </s>`,
# with `<SEP>` added to the tokenizer as its sep_token.
OPT_SEP_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'].strip() + ' ' + sep_token }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
# tulu: by the name open-instruct gives it; llama-2-no-bos and opt-sep: the memory-efficiency source's
CHAT_TEMPLATES = {"tulu": OPEN_INSTRUCT_TULU_TEMPLATE, "llama-2-no-bos": LLAMA2_NO_BOS_TEMPLATE,
                  "opt-sep": OPT_SEP_TEMPLATE}
# (instruction, response) markers of a template's completion-only loss: everything up to the end of the
# response marker is prompt (trl's DataCollatorForCompletionOnlyLM templates in the memory-efficiency source)
COMPLETION_MARKERS = {"llama-2-no-bos": ("[INST]", "[/INST]"), "opt-sep": (None, "<SEP>")}

# The gradient-projection source (DarynaKalinchuk/Gradient_dimensionality_reduction, olmo_training_utils.py
# @ d73147d) overwrites the tokenizer's chat template with these three lines on every call. HF renders chat
# templates with trim_blocks and lstrip_blocks: the newline after `{% for %}` and the indent before `{% endfor %}`
# go, the 4 spaces before `{{` stay. Each message becomes `    <|user|> {content.strip()}\n`, and every other
# role (system included) `    <|assistant|> ...\n`; no BOS or EOS, and add_generation_prompt is never read, so
# the `<|assistant|>` prefix stays in the loss. Byte-exact: the indents and newlines are part of the tokens.
GDR_OLMO_TEMPLATE = (
    "{% for message in messages %}\n"
    "    {{ '<|user|>' if message['role'] == 'user' else '<|assistant|>' }} {{ message['content'].strip() }}\n"
    "    {% endfor %}"
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


# Dolly (databrickslabs/dolly training/consts.py @ e2d664d): its input key has no `### ` (unlike Alpaca's)
DOLLY_INTRO = ALPACA_INTRO
INSTRUCTION_KEY, INPUT_KEY, RESPONSE_KEY, END_KEY = "### Instruction:", "Input:", "### Response:", "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"
ALPACA_INPUT_KEY = "### Input:"


def dolly_prompt(instruction: str, response: str, context: str = "") -> str:
    """The Dolly training text: intro, instruction, optional input, response, end key."""
    parts = [DOLLY_INTRO, f"{INSTRUCTION_KEY}\n{instruction}"]
    if context:
        parts.append(f"{INPUT_KEY}\n{context}")
    parts.append(f"{RESPONSE_KEY_NL}{response}")
    parts.append(END_KEY)
    return "\n\n".join(parts)


# the tiny tokenizers' training text (changing it changes every tiny model)
MARKUP = ["<|user|>\n", "<|assistant|>\n", "<|system|>\n", INSTRUCTION_KEY + "\n", ALPACA_INPUT_KEY + "\n",
          RESPONSE_KEY_NL, END_KEY, ALPACA_INTRO, ALPACA_INTRO_WITH_INPUT]
