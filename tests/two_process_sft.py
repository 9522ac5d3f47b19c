"""Run by test_training under torchrun: an SFT run in 2 CPU processes with the callback attached."""

import os
import sys

import torch.distributed as dist
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from learndyn.data import load_preferences
from learndyn.models import load_model
from learndyn.training.callback import LearningDynamicsCallback
from learndyn.training.recipes import trl_rows

model_dir, probes, run = sys.argv[1:4]
model, tokenizer = load_model(model_dir, device="cpu")
args = SFTConfig(output_dir=run + "-ckpt", per_device_train_batch_size=2, num_train_epochs=1, learning_rate=1e-3,
                 use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                 max_length=256, ddp_backend="gloo")
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(trl_rows(load_preferences("example", limit=8), "sft")),
                     processing_class=tokenizer)
trainer.add_callback(LearningDynamicsCallback(probes, out=run, every=1))
trainer.train()
dist.barrier()  # rank 0 has written its last shard
dist.destroy_process_group()
# gloo's worker threads now and then abort the interpreter at exit (SIGABRT, "terminate called
# without an active exception"; 2 full-suite runs failed on it, one of them CI) even after
# destroy_process_group, which drops only c10d's own reference to the group: the trainer's DDP
# wrapper keeps one, torn down with the interpreter. The run's files are written, so leave without
# the teardown, as tests/sharded_worker.py does.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
