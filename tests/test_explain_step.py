"""explain's Δθ is the step a real optimizer takes: the loss written pair by pair as TRL writes it, one
plain forward per sequence, autograd, torch's clip_grad_norm_ and torch.optim.AdamW. Float64 GPT-2."""

from __future__ import annotations

import pytest
import torch

from learndyn.data import Preference
from learndyn.dynamics.explain import explain_step
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
