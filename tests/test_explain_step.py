"""explain's Δθ is the step a real optimizer takes: the loss written pair by pair as TRL writes it, one
plain forward per sequence, autograd, torch's clip_grad_norm_ and torch.optim.AdamW. Float64 GPT-2."""

from __future__ import annotations

import pytest
import torch

from learndyn.data import Preference
from learndyn.dynamics.step import explain_step
from learndyn.dynamics.sequences import encode_update
from learndyn.dynamics.updates import OptimizerRule
from learndyn.probes.files import Probe

UPDATE = [
    Preference("u0", "Human: How do I make tea? Assistant:", " Boil the water, then steep.", " I cannot help."),
    Preference("u1", "Human: What is a horseshoe? Assistant:", " A U-shaped metal plate.", " No idea at all, sorry."),
]
PROBES = [Probe("p", "Human: Name a language. Assistant:", {"chosen": " Python.", "rejected": " Snake."})]


def plain_loss(model, tokenizer, loss: str, beta: float, ref: list[float]) -> torch.Tensor:
    """The update's loss with one forward per sequence; log π(y) summed over y's tokens (incl. EOS)."""
    seqs = encode_update(UPDATE, tokenizer, pairwise=loss != "sft", max_length=None)
    logps, counts, token_losses = [], [], []
    for ids, start in zip(seqs.ids, seqs.starts):
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
        picked = logp[torch.arange(start - 1, len(ids) - 1), x[0, start:]]
        logps.append(picked.sum())
        counts.append(len(picked))
        token_losses.append(-picked)
    if loss == "sft":  # mean over all response tokens of the batch
        return torch.cat(token_losses).mean()
    p = len(UPDATE)
    per_pair = []
    for i in range(p):
        c, r = logps[i] - ref[i], logps[p + i] - ref[p + i]
        if loss == "dpo":
            per_pair.append(-torch.nn.functional.logsigmoid(beta * (c - r)))
        elif loss == "ipo":  # TRL's ipo: each log-ratio per completion token
            per_pair.append((c / counts[i] - r / counts[p + i] - 1 / (2 * beta)) ** 2)
    return torch.stack(per_pair).mean()


@pytest.mark.parametrize("loss", ["sft", "dpo", "ipo"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_delta_is_the_step_torch_takes(tiny_gpt2, loss, max_norm):
    model, tokenizer = tiny_gpt2
    model.double()
    rule = OptimizerRule("adamw", lr=1e-3, weight_decay=0.01, max_grad_norm=max_norm)
    beta = 0.5
    explained = explain_step(model, tokenizer, UPDATE, PROBES, loss=loss, rule=rule, beta=beta, keep_delta=True)

    with torch.no_grad():  # the reference is the model before the step, as at the start of a DPO run
        seqs = encode_update(UPDATE, tokenizer, pairwise=True, max_length=None)
        ref = [float(torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
                     [torch.arange(s - 1, len(ids) - 1), torch.tensor(ids[s:])].sum()) for ids, s in zip(seqs.ids, seqs.starts)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=rule.lr, weight_decay=rule.weight_decay)
    model.zero_grad()
    plain_loss(model, tokenizer, loss, beta, ref).backward()
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert norm > 2 * max_norm  # the clip bites
    optimizer.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(explained.delta[name], param.detach() - before[name],
                                   rtol=1e-6, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss,max_length", [("sigmoid", 512), ("ipo", 512), ("sigmoid", 96)])
def test_one_step_of_our_own_dpo_run_is_explained(tiny_folder, tmp_path, loss, max_length):
    """`train dpo` takes one TRL step (AdamW, the Trainer's gradient clipping at 1.0); explain, given
    the same batch, loss, rule and max_length, lands on the same parameters: its "actual" change of
    every probe equals the change the run's metrics recorded, and the first-order prediction is close
    to it. At max_length 96 training cuts prompts and sequences: explain must cut them the same way."""
    import pandas as pd

    from learndyn.data import load_preferences
    from learndyn.models import load_model
    from learndyn.probes.build import build_probes
    from learndyn.probes.files import write_probes
    from learndyn.training.recipes import TrainSettings, train
    from learndyn.training.runs import read_metrics

    probes = build_probes(load_preferences("example", limit=2))
    write_probes(probes, tmp_path / "p.jsonl")
    lr = 1e-4
    run = train(TrainSettings(phase="dpo", data="example", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "dpo"),
                              model=str(tiny_folder), loss=loss, beta=0.1, learning_rate=lr, limit=4, batch_size=4,
                              epochs=1, every=1, max_length=max_length, save_model=False))
    metrics = read_metrics(run).pivot_table(index=["example_id", "response_type"], columns="step", values="logp_sum")
    recorded = (metrics[1] - metrics[0]).rename("recorded")

    model, tokenizer = load_model(str(tiny_folder))
    rule = OptimizerRule("adamw", lr=lr, weight_decay=0.0, max_grad_norm=1.0)  # the Trainer's defaults
    def explain(cut: int | None) -> pd.DataFrame:
        changes = explain_step(model, tokenizer, load_preferences("example", limit=4), probes,
                               loss={"sigmoid": "dpo"}.get(loss, loss), beta=0.1, rule=rule, max_length=cut).changes
        return changes.set_index(["example_id", "response_type"]).join(recorded, how="inner")

    both = explain(max_length)
    assert len(both) == len(recorded) > 10
    scale = both["recorded"].abs().max()
    assert (both["actual"] - both["recorded"]).abs().max() < 5e-3 * scale  # the same step (fp32 sums of ~1000 nats)
    assert (both["predicted"] - both["recorded"]).abs().max() < 0.05 * scale  # first order
    if max_length < 512:  # the cut matters: without it, explain describes another step
        uncut = explain(None)
        assert (uncut["actual"] - uncut["recorded"]).abs().max() > 0.05 * scale
