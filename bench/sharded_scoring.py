"""Sharded (FSDP2) probe scoring in 2 CPU processes on gloo, against one process.

    PYTHONPATH=src .venv/bin/python bench/sharded_scoring.py [--prompts 24] [--layers 4] [--hidden 256]

Relaunches itself under `torchrun --nproc_per_node 2`. A random Llama (vocabulary 8192) is sharded
with `fully_shard` per decoder layer and at the root; the probes are random token ids (prompts of
8-120 tokens, 3 responses of 1-60 tokens each). It prints:
  agreement   max relative difference of every metric, sharded vs the unsharded model in one process;
  strategies  the time of one evaluation when ranks deal the prompts out and pad to the busiest
              rank's call count (learndyn's default for FSDP2) vs every rank scoring everything,
              and the unsharded model scoring everything in one process (1 thread);
  callback    one LearningDynamicsCallback evaluation on the sharded model vs one training step
              (forward + backward + SGD on 2 rows of 256 tokens) of the same model.
Each time is the median of --repeats runs (the two strategies alternate). Each process runs torch
on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args()


def timed(run, repeats: int) -> tuple[float, object]:
    import torch.distributed as dist

    times, result = [], None
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        result = run()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def worker(args: argparse.Namespace) -> None:
    import random

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from learndyn.probes.files import Probe
    from learndyn.scoring import METRICS, EncodedPrompt, dealt, body_calls, score_encoded
    from learndyn.training.callback import LearningDynamicsCallback

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    vocab = 8192
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rng = random.Random(0)
    encoded = [EncodedPrompt(f"p{i}", [rng.randrange(vocab) for _ in range(rng.randint(8, 120))],
                             [(t, [rng.randrange(vocab) for _ in range(rng.randint(1, 60))], False)
                              for t in ("chosen", "rejected", "other_train")]) for i in range(args.prompts)]

    alone_s, want = timed(lambda: score_encoded(model, encoded, progress=None), args.repeats)
    shard = LlamaForCausalLM(config)
    shard.load_state_dict(model.state_dict())
    for layer in shard.model.layers:
        fully_shard(layer)
    fully_shard(shard)
    # alternate the two strategies, so that the machine's drifting load hits both alike
    deal_times, every_times = [], []
    for _ in range(args.repeats):
        t, dealt = timed(lambda: score_encoded(shard, encoded, progress=None, across_ranks=True), 1)
        deal_times.append(t)
        t, everything = timed(lambda: score_encoded(shard, encoded, progress=None, across_ranks=False), 1)
        every_times.append(t)
    deal_s, every_s = statistics.median(deal_times), statistics.median(every_times)

    def worst(got) -> float:
        return max(float(((got[m] - want[m]).abs() / want[m].abs().clip(lower=1e-12)).max()) for m in METRICS)

    calls = [body_calls([encoded[i] for i in dealt(encoded, r, world)], 1024) for r in range(world)]

    # the callback against a training step, on the sharded model
    batch = torch.tensor([[rng.randrange(vocab) for _ in range(256)] for _ in range(2)])
    optimizer = torch.optim.SGD(shard.parameters(), lr=1e-3)

    def step() -> None:
        shard.train()
        shard(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    probes = [Probe(e.example_id, "x", {"chosen": "y"}) for e in encoded]  # replaced by `encoded` below
    with tempfile.TemporaryDirectory() as tmp:
        callback = LearningDynamicsCallback(probes, out=Path(tmp) / "run", every=1)
        callback.encoded = encoded  # the random ids above, no tokenizer needed
        args_, control = SimpleNamespace(process_index=rank), SimpleNamespace(should_training_stop=False)
        state = SimpleNamespace(global_step=0, epoch=0.0, log_history=[])
        step_times, callback_times = [], []
        for n in range(1, args.repeats + 1):
            step_s, _ = timed(step, 1)
            state.global_step = n
            cb_s, _ = timed(lambda: callback.on_step_end(args_, state, control, model=shard), 1)
            step_times.append(step_s)
            callback_times.append(cb_s)
    figures = {
        "prompts": len(encoded), "responses": sum(len(e.responses) for e in encoded),
        "body_calls_per_rank": calls,
        "max_rel_diff_dealt": worst(dealt), "max_rel_diff_everything": worst(everything),
        "unsharded_1proc_s": alone_s, "sharded_deal_pad_s": deal_s, "sharded_every_rank_all_s": every_s,
        "train_step_s": statistics.median(step_times), "callback_eval_s": statistics.median(callback_times),
    }
    if rank == 0:
        print(json.dumps(figures), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo threads may abort the interpreter's teardown (see tests/sharded_worker.py)


def main() -> None:
    args = parse()
    if "RANK" in os.environ:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           *sys.argv[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"the 2-process run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    f = json.loads(lines[-1])
    print(f"{f['prompts']} prompts, {f['responses']} responses; body calls per rank when dealt out: "
          f"{f['body_calls_per_rank']} (the shorter rank pads)")
    print(f"max relative difference vs one process: dealt out {f['max_rel_diff_dealt']:.1e}, "
          f"every rank all {f['max_rel_diff_everything']:.1e}")
    print(f"one evaluation: deal out + pad {f['sharded_deal_pad_s']:.2f} s, every rank scores all "
          f"{f['sharded_every_rank_all_s']:.2f} s ({f['sharded_every_rank_all_s'] / f['sharded_deal_pad_s']:.2f}x), "
          f"unsharded in one process {f['unsharded_1proc_s']:.2f} s")
    print(f"callback evaluation {f['callback_eval_s']:.2f} s vs training step {f['train_step_s']:.2f} s "
          f"({f['callback_eval_s'] / f['train_step_s']:.2f} steps)")
    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=1))


if __name__ == "__main__":
    main()
