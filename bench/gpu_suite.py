"""The GPU suite: one script that a person with a GPU runs as is, and that prints every figure of issue 14.

    python bench/gpu_suite.py [--shapes 0.5b,1b] [--prompts 16] [--json gpu_suite.json]
    python bench/gpu_suite.py --smoke        # a tiny model on the CPU, to check the script itself

For each model shape (Qwen2.5-0.5B and Llama-3.2-1B, built from their configs with random weights:
throughput and memory do not depend on the weights) it measures, in one run:
  scoring   learndyn's scorer against the plain loop (one sequence at a time, full log-softmax), both
            on the same bf16 model; the speed-up, the largest relative difference of logp_sum, and the
            achieved FLOP/s on the FLOP floor of the work as a fraction of the bf16 matmul peak
            measured at the start of the same run (targets: >= 5x and >= 40%);
  tracking  a short TRL SFT run (bf16 mixed precision) with and without the LearningDynamicsCallback:
            the share of the tracked run spent scoring;
  explain   `explain_step` (fp32) against the naive route (one backward per probe response) on the
            same Δθ: the time ratio and the largest difference of the predicted change;
  memory    the peak of allocated GPU memory of each part;
and, when two GPUs are present, the FSDP2 run of examples/trl_sft_callback.py under accelerate with
examples/accelerate_fsdp.yaml against the same script on one GPU: rows equal within 1e-4 or not.

FLOP floor (as in score_throughput.py): 2 x non-embedding parameters per token that must be computed
(each prompt once, each response once) + 2 x hidden x vocab at response positions only. The probes
are the packaged example data's (chosen, rejected, other prompts' answers, fluent and shuffled text;
no greedy or rephrases, which need a trained model), tokenized by the built-in model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Published shapes (config.json of Qwen/Qwen2.5-0.5B and meta-llama/Llama-3.2-1B), random weights.
SHAPES = {
    "0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                           rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)),
    "1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                           tie_word_embeddings=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="0.5b,1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--prompts", type=int, default=16, help="probe prompts (each with its response types)")
    parser.add_argument("--explain-prompts", type=int, default=2, help="probe prompts for explain vs naive")
    parser.add_argument("--steps", type=int, default=8, help="SFT optimizer steps of the tracking part")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, not the GPU")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.prompts, args.explain_prompts, args.steps = "tiny", 2, 1, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no GPU here: run with --smoke to check the script on the CPU")

    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    from learndyn import build_probes, load_model, load_preferences

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    tokenizer = load_model()[1]  # the built-in tokenizer (49,152 tokens): every shape embeds at least that many
    prefs = load_preferences("example")
    probes = build_probes(prefs[: args.prompts], held_out=load_preferences("example:test"))
    figures: dict = {"date": time.strftime("%Y-%m-%d"), "device": _device_name(device), "torch": torch.__version__}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    figures["matmul_peak_tflops"] = matmul_peak(device, dtype) / 1e12
    print(f"{figures['device']}, torch {torch.__version__}; {str(dtype).removeprefix('torch.')} matmul peak measured "
          f"now: {figures['matmul_peak_tflops']:.1f} TFLOP/s")

    for shape in args.shapes.split(","):
        print(f"\n== {shape}: {SHAPES[shape][0]} shape, random weights ==")
        part = figures[shape] = {}
        part["scoring"] = bench_scoring(shape, device, dtype, tokenizer, probes, figures["matmul_peak_tflops"] * 1e12)
        part["tracking"] = bench_tracking(shape, device, tokenizer, prefs, probes, args.steps)
        part["explain"] = bench_explain(shape, device, tokenizer, prefs, probes[: args.explain_prompts])
    if device == "cuda" and torch.cuda.device_count() >= 2:
        figures["fsdp"] = bench_fsdp(args.shapes.split(",")[0])
    elif device == "cuda":
        print("\none GPU: the 2-GPU FSDP run is skipped")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
        print(f"\nfigures written to {args.json}")


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, values = SHAPES[shape]
    config = AutoConfig.for_model(kind, **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def bench_scoring(shape, device, dtype, tokenizer, probes, peak_flops) -> dict:
    from learndyn.lm import split_model
    from learndyn.scoring import encode_probes, score_encoded, score_plain

    model = build_model(shape, device, dtype)
    encoded = encode_probes(probes, tokenizer, max_length=1024)
    n_resp = sum(len(e.responses) for e in encoded)
    prompt_tokens = sum(len(e.prompt_ids) for e in encoded)
    resp_tokens = sum(len(ids) for e in encoded for _, ids, _ in e.responses)
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for p in model.parameters()) - embed * (1 if cfg.tie_word_embeddings else 2)
    floor = 2 * body * (prompt_tokens + resp_tokens) + 2 * embed * resp_tokens
    split_model(model).shares_cache()  # one-time checks, not part of the timed work
    score_encoded(model, encoded[:1], progress=None)  # warm-up (kernels, allocator)

    _reset_peak(device)
    fast_s, fast = _timed(device, lambda: score_encoded(model, encoded, progress=None))
    memory = _peak(device)
    plain_s, plain = _timed(device, lambda: score_plain(model, encoded, dtype=torch.float32))
    rel = float(((fast["logp_sum"] - plain["logp_sum"]).abs() / plain["logp_sum"].abs()).max())
    out = {"responses": n_resp, "prompt_tokens": prompt_tokens, "response_tokens": resp_tokens,
           "learndyn_s": fast_s, "plain_s": plain_s, "speedup": plain_s / fast_s,
           "floor_tflops": floor / fast_s / 1e12, "fraction_of_peak": floor / fast_s / peak_flops,
           "max_rel_diff_logp_sum": rel, "peak_memory_gib": memory}
    print(f"scoring {n_resp} responses: learndyn {fast_s:.2f} s, plain loop {plain_s:.2f} s, speed-up "
          f"{out['speedup']:.1f}x (target 5x); {out['floor_tflops']:.1f} TFLOP/s on the floor = "
          f"{out['fraction_of_peak']:.0%} of peak (target 40%); max rel. diff of logp_sum {rel:.1e}; "
          f"peak memory {_gib(memory)}")
    del model
    _free(device)
    return out


def bench_tracking(shape, device, tokenizer, prefs, probes, steps) -> dict:
    """The same short SFT run twice; with the callback, each evaluation is timed."""
    from learndyn.training.callback import LearningDynamicsCallback
    from learndyn.training.recipes import TrainSettings, build_trainer, quiet_progress

    every = max(1, steps // 2)
    times, memory = {}, {}
    for tracked in (False, True):
        model = build_model(shape, device, torch.float32)  # fp32 weights, bf16 autocast (Trainer bf16=True)
        model.config.use_cache = False
        with tempfile.TemporaryDirectory() as tmp:
            settings = TrainSettings(phase="sft", data="example", probes="-", out=tmp, epochs=1, batch_size=4,
                                     learning_rate=1e-5, max_length=512, device=device)
            data = prefs[: 4 * steps]
            trainer = build_trainer(settings, model, tokenizer, data, Path(tmp))
            quiet_progress(trainer, f"SFT {shape}")
            trainer.args.disable_tqdm = True
            evaluations: list[float] = []
            if tracked:
                callback = LearningDynamicsCallback(probes, out=tmp, every=every, tokenizer=tokenizer, max_length=512)
                _time_evaluations(callback, evaluations, device)
                trainer.add_callback(callback)
            _reset_peak(device)
            times[tracked], _ = _timed(device, trainer.train)
            memory[tracked] = _peak(device)
        del model, trainer
        _free(device)
    scoring = sum(evaluations)
    out = {"steps": steps, "every": every, "untracked_s": times[False], "tracked_s": times[True],
           "evaluations": len(evaluations), "scoring_s": scoring, "scoring_share": scoring / times[True],
           "peak_memory_gib": memory[True], "peak_memory_untracked_gib": memory[False]}
    print(f"tracking: SFT {steps} steps {times[False]:.1f} s; with the callback every {every} steps "
          f"{times[True]:.1f} s ({len(evaluations)} evaluations, {scoring:.1f} s = {out['scoring_share']:.0%} of the "
          f"run); peak memory {_gib(memory[True])} (untracked {_gib(memory[False])})")
    return out


def bench_explain(shape, device, tokenizer, prefs, probes) -> dict:
    from learndyn.dynamics.step import explain_step, predict_naive

    model = build_model(shape, device, torch.float32)  # first-order agreement needs more than bf16
    _reset_peak(device)
    explain_s, result = _timed(device, lambda: explain_step(model, tokenizer, prefs[:1], probes, loss="sft",
                                                            keep_delta=True))
    memory = _peak(device)
    naive_s, naive = _timed(device, lambda: predict_naive(model, tokenizer, probes, result.delta))
    ours = result.changes.set_index(["example_id", "response_type"])["predicted"]
    theirs = naive.set_index(["example_id", "response_type"])["predicted"].reindex(ours.index)
    rel = float((ours - theirs).abs().max() / max(float(theirs.abs().max()), 1e-30))
    out = {"responses": len(ours), "explain_s": explain_s, "naive_s": naive_s, "speedup": naive_s / explain_s,
           "max_diff_vs_naive": rel, "relative_error": result.summary["relative_error"], "peak_memory_gib": memory}
    print(f"explain {len(ours)} responses: {explain_s:.1f} s (naive route {naive_s:.1f} s, {out['speedup']:.1f}x); "
          f"predicted vs naive max diff {rel:.1e} of the largest; first-order relative error "
          f"{out['relative_error']:.3f}; peak memory {_gib(memory)}")
    del model
    _free(device)
    return out


def bench_fsdp(shape: str) -> dict:
    """examples/trl_sft_callback.py on 2 GPUs with FSDP2 and on 1 GPU; the metrics must agree."""
    import pandas as pd

    script, config = ROOT / "examples" / "trl_sft_callback.py", ROOT / "examples" / "accelerate_fsdp.yaml"
    if not script.is_file() or not config.is_file():
        print("examples/ lacks the FSDP script or config: the 2-GPU run is skipped")
        return {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(shape, "cpu", torch.float32).save_pretrained(model_dir)
        runs = {}
        for name, launch in (("one_gpu", ["--num_processes", "1"]),
                             ("fsdp_2gpu", ["--config_file", str(config), "--num_processes", "2"])):
            run = Path(tmp) / name
            command = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(script),
                       "--model", str(model_dir), "--tokenizer", "smollm2-135m-instruct", "--out", str(run)]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ))
            out[f"{name}_s"] = time.perf_counter() - start
            if done.returncode != 0:
                print(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
                out[f"{name}_failed"] = True
                return out
            runs[name] = pd.concat([pd.read_parquet(p) for p in sorted((run / "metrics").glob("*.parquet"))])
    keys = ["phase", "step", "example_id", "response_type"]
    a = runs["one_gpu"].set_index(keys)["logp_sum"]
    b = runs["fsdp_2gpu"].set_index(keys)["logp_sum"].reindex(a.index)
    out["max_rel_diff"] = float(((a - b).abs() / a.abs()).max())
    out["rows"] = len(a)
    print(f"FSDP2 on 2 GPUs: {out['fsdp_2gpu_s']:.0f} s vs one GPU {out['one_gpu_s']:.0f} s; {len(a)} metric rows, "
          f"max rel. diff of logp_sum {out['max_rel_diff']:.1e} (bf16 training: steps after 0 may differ by more)")
    return out


def matmul_peak(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 20) -> float:
    """FLOP/s of a large square matmul in `dtype`: the practical peak the floor is compared with."""
    n = n or (8192 if device == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds, _ = _timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * n**3 * repeats / seconds


def _time_evaluations(callback, timings: list[float], device: str) -> None:
    evaluate = callback._evaluate

    def timed(*args, **kwargs):
        before = len(callback.done)
        seconds, _ = _timed(device, lambda: evaluate(*args, **kwargs))
        if len(callback.done) > before:
            timings.append(seconds)

    callback._evaluate = timed


def _timed(device: str, work):
    _sync(device)
    start = time.perf_counter()
    result = work()
    _sync(device)
    return time.perf_counter() - start, result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
