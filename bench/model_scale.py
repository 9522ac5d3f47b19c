"""Bigger models on this machine: time and peak memory of score, track and explain, against `memory.py`'s estimate.

    python bench/model_scale.py --size 135m     # SmolLM2-135M shape (Llama, 30 layers, vocab 49,152)
    python bench/model_scale.py --size 0.5b     # Qwen2.5-0.5B shape (24 layers, hidden 896, vocab 151,936)

Random weights built from a config (nothing to download; speed and memory depend on the shape
only), fp32 on the CPU, the built-in model's tokenizer (its ids fit both vocabularies). Probes: the
first --prompts prompts of the HH probe set, --types response types each. Phases, in one process:

    score    `score_probes` over the probes
    explain  `explain_step`: one SFT step with SGD on one update row, explained on the probes
    track    --steps SFT optimizer steps (AdamW, TRL's SFTTrainer) with the LearningDynamicsCallback
             scoring the probes at step 0 and after every step

A thread samples the resident set size every 20 ms; per phase it reports the peak above the RSS
the process had before the model was built (so the weights count, the Python/torch runtime does
not), next to `memory.estimate`'s total. Run one size per process: RSS never shrinks much.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

PROBES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh_helpful_probes" / "train.jsonl"
SIZES = {
    "135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rope_theta=100000.0, tie_word_embeddings=True)),
    "0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1000000.0, tie_word_embeddings=True)),
}


class PeakRSS:
    """Samples this process's RSS in a thread; `phase()` starts a new peak."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def phase(self) -> None:
        self.peak = self.rss()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def build_model(size: str, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, shape = SIZES[size]
    config = AutoConfig.for_model(kind, **shape, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tokenizer_of_builtin():
    from transformers import AutoTokenizer

    from learndyn.models import builtin_gguf_path

    gguf = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="135m")
    parser.add_argument("--probe-file", type=Path, default=PROBES,
                        help="probe file (default: the shared HH probe set, ../shared/data/hh_helpful_probes/train.jsonl)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--types", default="chosen,rejected,other_test")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--phases", default="score,explain,track")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from learndyn import load_preferences
    from learndyn.dynamics.step import explain_step
    from learndyn.dynamics.updates import OptimizerRule
    from learndyn.memory import estimate, free_memory, gb
    from learndyn.probes.files import read_probes
    from learndyn.scoring import score_probes

    types = args.types.split(",")
    tokenizer = tokenizer_of_builtin()
    probes = read_probes(str(args.probe_file.resolve()), limit=args.prompts)
    update = load_preferences("example", limit=max(args.steps * 2, 1))
    n_resp = sum(len([t for t in p.responses if t in types]) for p in probes)
    sampler = PeakRSS()
    base = sampler.rss()
    t0 = time.perf_counter()
    model = build_model(args.size, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.size}: {n_params / 1e6:.1f}M parameters ({gb(4 * n_params)} fp32), built in "
          f"{time.perf_counter() - t0:.1f} s; {n_resp} probe responses ({args.prompts} prompts x {types}); "
          f"free memory {gb(free_memory('cpu') or 0)}; load {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    rows = []

    def report(phase: str, seconds: float, est, extra: str = "") -> None:
        peak = sampler.peak - base
        rows.append((phase, seconds, peak, est.total))
        print(f"  {phase:8s} {seconds:7.1f} s  {seconds / n_resp:6.2f} s/response  peak RSS above base {gb(peak)}  "
              f"estimate {gb(est.total)} (weights {gb(est.weights)} + state {gb(est.state)} + "
              f"activations {gb(est.activations)})  estimate/actual {est.total / max(peak, 1):.2f}{extra}", flush=True)

    phases = args.phases.split(",")
    if "score" in phases:
        sampler.phase()
        t0 = time.perf_counter()
        score_probes(model, tokenizer, probes, types=types, batch_tokens=1024)
        report("score", time.perf_counter() - t0, estimate(model, "score", tokens=1024))

    if "explain" in phases:
        sampler.phase()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            got = explain_step(model, tokenizer, update[:1], probes, loss="sft", rule=OptimizerRule("sgd", 1e-4),
                               types=types, chunk_tokens=args.chunk_tokens, positions_out=Path(tmp) / "positions.parquet")
        t = got.summary["timings"]
        report("explain", time.perf_counter() - t0, estimate(model, "explain", tokens=args.chunk_tokens, causes=1),
               f"  (update gradient {t['update_gradient_s']:.1f} s, probes {t['probes_s']:.1f} s, "
               f"{got.summary['positions']} positions)")

    if "track" in phases:
        sampler.phase()
        t0 = time.perf_counter()
        scoring = track(model, tokenizer, update, probes, types, args.steps)
        seconds = time.perf_counter() - t0
        report("track", seconds, estimate(model, "train", tokens=2 * 256),
               f"  ({args.steps} SFT steps of 2 x <=256 tokens, AdamW; {len(scoring)} evaluations "
               f"{sum(scoring):.1f} s = {sum(scoring) / len(scoring) / n_resp:.2f} s/response each; "
               f"{(seconds - sum(scoring)) / args.steps:.1f} s per step without them)")
    sampler.stop()
    print(f"  process peak RSS (getrusage) {gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}; "
          f"load now {os.getloadavg()[0]:.2f}")


def track(model, tokenizer, prefs, probes, types, steps: int) -> list[float]:
    """A few SFT steps through TRL with the callback scoring the probes; returns each evaluation's seconds."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from learndyn.training.callback import LearningDynamicsCallback

    with tempfile.TemporaryDirectory() as tmp:
        callback = LearningDynamicsCallback(probes, out=tmp, every=1, tokenizer=tokenizer, types=types,
                                            batch_tokens=1024)
        timings: list[float] = []
        evaluate = callback._evaluate

        def timed(*args, **kwargs):
            start, before = time.perf_counter(), len(callback.done)
            evaluate(*args, **kwargs)
            if len(callback.done) > before:
                timings.append(time.perf_counter() - start)

        callback._evaluate = timed
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-5,
                           max_length=256, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                           completion_only_loss=True, disable_tqdm=True, dataloader_num_workers=0)
        rows = [{"prompt": p.prompt, "completion": [{"role": "assistant", "content": p.chosen}]
                 if isinstance(p.prompt, list) else p.chosen} for p in prefs]  # TRL wants both in one format
        model.config.use_cache = False
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[callback])
        trainer.train()
        model.eval()
    return timings


if __name__ == "__main__":
    main()
