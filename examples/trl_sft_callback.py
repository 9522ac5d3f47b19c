"""Track probe log-probabilities during a TRL SFT run: the smallest user-style script.

One process (CPU or one GPU):
    python examples/trl_sft_callback.py --model MODEL_DIR_OR_HUB_ID --out runs/sft
Several GPUs, plain data parallel or FSDP2-sharded (the callback needs no change):
    accelerate launch --config_file examples/accelerate_ddp.yaml  examples/trl_sft_callback.py --model ... --out ...
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/trl_sft_callback.py --model ... --out ...

Metrics land in OUT/metrics/*.parquet (one shard per evaluation, written by the main process);
`learndyn report OUT` draws them. bench/gpu_suite.py runs this script on 1 and 2 GPUs and compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import learndyn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder or hub id to finetune")
    parser.add_argument("--tokenizer", help="a tokenizer folder, hub id or learndyn's built-in name (default: --model)")
    parser.add_argument("--data", default="example", help="preference data: a file, hub id[:split] or 'example'")
    parser.add_argument("--probes", help="a probe file (default: probes built from the first 8 training examples)")
    parser.add_argument("--out", required=True, help="the run folder that receives metrics/")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--every", type=int, default=2, help="score the probes every this many steps")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training row and per probe")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    source = args.tokenizer or args.model
    tokenizer = (AutoTokenizer.from_pretrained(source) if Path(source).is_dir()
                 else learndyn.load_model(source, device="cpu")[1])  # the built-in name needs learndyn's loader
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    prefs = learndyn.load_preferences(args.data)
    probes = learndyn.read_probes(args.probes) if args.probes else learndyn.build_probes(prefs[:8])
    # SFT on the chosen responses; a conversation prompt takes its completion as an assistant message
    rows = [{"prompt": p.prompt,
             "completion": p.chosen if isinstance(p.prompt, str) else [{"role": "assistant", "content": p.chosen}]}
            for p in prefs]

    config = SFTConfig(output_dir=str(Path(args.out) / "trainer"), max_steps=args.steps, per_device_train_batch_size=2,
                       learning_rate=1e-5, max_length=args.max_length, logging_steps=1, save_strategy="no",
                       report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.add_callback(learndyn.LearningDynamicsCallback(probes, out=args.out, every=args.every, trainer=trainer,
                                                           max_length=args.max_length))
    trainer.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo/NCCL threads otherwise may abort the interpreter at exit


if __name__ == "__main__":
    main()
