"""Will a job fit in memory? A rough estimate before the work starts, and one line when it did not fit.

A model that does not fit fails late and noisily: a CUDA OOM traceback after minutes of loading, or
on a CPU machine the kernel's OOM killer with no message at all. `check_fits` compares what a job
will surely allocate with the memory free on the device, before the first allocation:

    job      sure to be allocated                                   plus activations, roughly
    load     weights                                                —
    score    weights (no gradients)                                 KV cache, one layer's work, LM-head rows
    train    weights + 3 × trainable (gradients, two Adam moments)  saved activations for backward
    explain  weights + (1 + causes) × trainable (θ+Δθ, a tangent    a jvp forward per cause, logits per cause
             per cause of Δθ)

so full-parameter training needs about 4× the weights and explain (2 + causes)×; with LoRA only the
adapters count as trainable. Weights already on the device are already spent, so they are not asked
of the free memory again. When the sure part alone exceeds the free memory, `check_fits` raises a
one-line `LearndynError`; when the whole estimate passes 90% of it, it warns (`MemoryWarning`),
since activations depend on the batch's contents. `out_of_memory` turns an OOM that still happens
into one line with the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from learndyn.errors import LearndynError

JOBS = ("load", "score", "train", "explain")
WARN_FRACTION = 0.9
_WHAT = {"load": "loading the model", "score": "scoring", "train": "training", "explain": "explaining"}
_FIX = {
    "load": "use --dtype bfloat16 (on a GPU), a smaller model, or a device with more memory",
    "score": "lower --batch-tokens, use --dtype bfloat16 on a GPU, or a smaller model",
    "train": "lower --batch-size or --max-length, train in bfloat16 on a GPU, or train LoRA adapters instead of all weights",
    "explain": "lower --chunk-tokens, explain fewer update rows, use --dtype bfloat16 on a GPU, "
               "or explain LoRA adapters (only trainable weights get tangents)",
}


class MemoryWarning(UserWarning):
    """The estimate is close to the free memory: the job may fail."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job needs on `device`; `available` is None where free memory cannot be read."""

    job: str
    device: str
    weights: int  # all parameters
    state: int  # gradients and optimizer moments (train), θ+Δθ and tangents (explain)
    activations: int  # rough; 0 when the model's shape is unknown (a bare parameter count)
    resident: int  # weights already on `device`: spent, so not asked of `available`
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.state + self.activations

    @property
    def sure(self) -> int:
        """What must still be allocated whatever the batch holds."""
        return max(self.weights + self.state - self.resident, 0)

    @property
    def needed(self) -> int:
        """What must still be allocated, activations included."""
        return max(self.total - self.resident, 0)

    def line(self) -> str:
        free = "unknown" if self.available is None else gb(self.available)
        return (f"{_WHAT[self.job]} needs about {gb(self.total)} on {self.device} (weights {gb(self.weights)}, "
                f"gradients/optimizer/tangents {gb(self.state)}, activations ~{gb(self.activations)}; "
                f"{gb(self.resident)} already there), {free} free")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def estimate(model_or_param_count: Any, job: str, *, tokens: int = 1024, causes: int = 3,
             bytes_per_param: int = 4, device: str | None = None) -> MemoryEstimate:
    """The estimate alone (no free-memory check). A model gives exact parameter bytes, its trainable
    share and its shape (for activations); a bare count assumes all parameters train, at
    `bytes_per_param` bytes each, and leaves activations out."""
    if job not in JOBS:
        raise LearndynError(f"unknown memory job '{job}'; valid: {', '.join(JOBS)}")
    if isinstance(model_or_param_count, int):
        weights = trainable = model_or_param_count * bytes_per_param
        resident, config, element = 0, None, bytes_per_param
        device = device or "cpu"
    else:
        model = model_or_param_count
        params = list(model.parameters())
        weights = sum(p.numel() * p.element_size() for p in params)
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        element = params[0].element_size() if params else bytes_per_param
        device = str(device or (params[0].device if params else "cpu"))
        resident = sum(p.numel() * p.element_size() for p in params if _same_device(str(p.device), device))
        config = getattr(model, "config", None)
    state = {"load": 0, "score": 0, "train": 3 * trainable, "explain": (1 + causes) * trainable}[job]
    acts = _activations(config, job, tokens, causes, element, device.startswith("cuda")) if config is not None else 0
    return MemoryEstimate(job, device, weights, state, acts, resident, None)


def check_fits(model_or_param_count: Any, job: str, *, tokens: int = 1024, causes: int = 3,
               bytes_per_param: int = 4, device: str | None = None,
               available: int | None = None) -> MemoryEstimate:
    """Raise a one-line LearndynError when `job` surely cannot fit in the free memory of `device`,
    warn (MemoryWarning) when the estimate passes 90% of it; return the estimate.

    `tokens` is the batch size in tokens (--batch-tokens, --chunk-tokens, batch × length for
    training); `causes` the tangents of explain (1 for an SFT step with SGD, up to 4). `available`
    overrides the free memory read from the device (psutil or /proc/meminfo on CPU,
    torch.cuda.mem_get_info on GPU)."""
    est = estimate(model_or_param_count, job, tokens=tokens, causes=causes, bytes_per_param=bytes_per_param,
                   device=device)
    free = available if available is not None else free_memory(est.device)
    est = MemoryEstimate(est.job, est.device, est.weights, est.state, est.activations, est.resident, free)
    if free is None:
        return est
    if est.sure > free:
        raise LearndynError(f"{_WHAT[job]} needs at least {gb(est.sure)} more on {est.device} "
                            f"(weights and {'optimizer state' if job == 'train' else 'tangents' if job == 'explain' else 'nothing else'}) "
                            f"but only {gb(free)} is free; {_FIX[job]}")
    if est.needed > WARN_FRACTION * free:
        warnings.warn(MemoryWarning(f"{est.line()}: it may run out of memory; if so, {_FIX[job]}"), stacklevel=2)
    return est


def free_memory(device: str = "cpu") -> int | None:
    """Bytes free on `device`: for a GPU what the driver reports, for the CPU what the kernel
    counts as available (free plus reclaimable caches); None when it cannot be read."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device != "cpu":
        return None  # mps, xpu, ...: no portable query
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), a CPU allocator failure (a RuntimeError) or a MemoryError."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def out_of_memory(err: BaseException, job: str) -> LearndynError:
    """One line for an OOM during `job`: what ran out, the allocator's own first line, and the fix."""
    detail = (str(err).strip().splitlines() or [""])[0].strip() or type(err).__name__
    if len(detail) > 160:
        detail = detail[:157] + "..."
    return LearndynError(f"out of memory while {_WHAT.get(job, job)} ({detail}); {_FIX.get(job, _FIX['score'])}")


@contextmanager
def reporting_oom(job: str) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into `out_of_memory`'s one line."""
    try:
        yield
    except Exception as err:
        if is_out_of_memory(err):
            raise out_of_memory(err, job) from None
        raise


def _same_device(a: str, b: str) -> bool:
    norm = lambda d: "cuda:0" if d == "cuda" else d  # noqa: E731
    return norm(a) == norm(b)


def _activations(config: Any, job: str, tokens: int, causes: int, element: int, gpu: bool) -> int:
    """Rough activation bytes for `tokens` tokens, from the model's shape. Logits are counted in
    float32 (scoring and explain widen them); the LM head works on 128 rows at a time when scoring
    on a CPU, 2,048 on a GPU, and on every response position when explaining and training."""
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    vocab = getattr(text, "vocab_size", 0) or 0
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1) or 1
    kv = (getattr(text, "num_key_value_heads", None) or heads) * (getattr(text, "head_dim", None) or hidden // heads)
    cache = 2 * 2 * layers * kv * tokens * element  # prompts' K and V, and each response's copy of them
    layer = tokens * (4 * hidden + 2 * inner) * element  # one layer's working set at a time
    if job == "load":
        return 0
    if job == "score":
        return cache + layer + min(tokens, 2048 if gpu else 128) * vocab * 4 * 4
    if job == "train":  # per layer kept for backward: attention inputs/outputs, MLP gates; logits and their grads
        return tokens * layers * (6 * hidden + 3 * inner) * element + tokens * vocab * 4 * 3
    return (1 + causes) * (cache + layer) + (2 + causes) * tokens * vocab * 4 + 10 * 128 * vocab * 4  # explain
