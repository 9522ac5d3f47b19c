"""How good is the first-order prediction on a real model? Built-in model, three learning rates.

    python bench/explain_accuracy.py [--responses 32] [--loss dpo] [--optimizer sgd] [--lrs 1e-3,1e-4,1e-5]
                                     [--lora] [--lora-r 16] [--sft-steps 4]

Explains one step on the first example-data pair against the first `--responses` probe responses
(example probe set, held-out answers included) at each learning rate, and prints the relative error
‖predicted − actual‖ / ‖actual‖ over responses (sequence-level Δ log π(y)), the rank correlation
between predicted and actual changes, and the same two numbers per token. The error should fall
roughly in proportion to the learning rate until float32 rounding of the actual change takes over.

With `--lora`, the model gets an r=16 adapter on every linear layer (alpha 32), trained first by a
few AdamW SFT steps on example pairs 1-8 (so that B != 0 and the step is not the special first one
of a fresh adapter), and the explained step moves the adapter only, as in a LoRA run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from learndyn import build_probes, load_model, load_preferences
from learndyn.dynamics.step import explain_step, rank_correlation
from learndyn.dynamics.updates import OptimizerRule

sys.path.insert(0, str(Path(__file__).parent))
from explain_cost import first_responses  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=32)
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lrs", default="1e-3,1e-4,1e-5")
    parser.add_argument("--lora", action="store_true", help="explain a step of an r=16 LoRA adapter")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--sft-steps", type=int, default=4, help="AdamW SFT steps on the adapter first (--lora)")
    args = parser.parse_args()

    model, tokenizer = load_model()
    prefs = load_preferences("example")
    if args.lora:
        model = lora_after_sft(model, tokenizer, prefs[1:9], args.lora_r, args.sft_steps)
    probes = first_responses(build_probes(prefs[:8], held_out=load_preferences("example:test")), args.responses)
    print(f"{args.loss} step on example pair 0 ({args.optimizer}), {sum(len(p.responses) for p in probes)} probe responses")
    print(f"{'lr':>8} {'rel. error':>11} {'rank corr.':>11} {'token rel. error':>17} {'token rank corr.':>17} "
          f"{'max |actual|':>13} {'time':>7}")
    for lr in (float(x) for x in args.lrs.split(",")):
        start = time.perf_counter()
        got = explain_step(model, tokenizer, prefs[:1], probes, loss=args.loss, rule=OptimizerRule(args.optimizer, lr))
        pos = got.positions
        token_err = ((pos["predicted"] - pos["actual"]) ** 2).sum() ** 0.5 / (pos["actual"] ** 2).sum() ** 0.5
        print(f"{lr:>8g} {got.summary['relative_error']:>11.3g} {got.summary['rank_correlation']:>11.4f} "
              f"{token_err:>17.3g} {rank_correlation(pos['predicted'], pos['actual']):>17.4f} "
              f"{got.changes['actual'].abs().max():>13.3g} {time.perf_counter() - start:>6.0f}s")


def lora_after_sft(model, tokenizer, prefs, r: int, steps: int, lr: float = 2e-4):
    """The model with a fresh LoRA adapter (alpha 2r on all linear layers) after `steps` AdamW steps
    of SFT (prompt masked) on `prefs`, two pairs a step; only the adapter is trainable."""
    import torch
    from peft import LoraConfig, get_peft_model

    from learndyn.data import render_prompt

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = 0.0
        for pref in (prefs[(2 * step) % len(prefs)], prefs[(2 * step + 1) % len(prefs)]):
            prompt = tokenizer(render_prompt(pref.prompt, tokenizer), add_special_tokens=False)["input_ids"]
            answer = tokenizer(pref.chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            loss = loss + model(input_ids=ids, labels=labels).loss / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"LoRA SFT step {step + 1}: loss {float(loss):.3f}")
    return model.eval()


if __name__ == "__main__":
    main()
