"""explain for GRPO's loss types: TRL's advantages, a residual equal to autograd of TRL's own loss,
Δθ equal to the step torch takes on the loss written completion by completion, first-order agreement
on a float64 model, and the split by sign of the advantage."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from learndyn.data import Preference
from learndyn.dynamics.groups import Group, advantages, encode_groups
from learndyn.dynamics.residuals import loss_value, residual, residual_parts
from learndyn.dynamics.step import explain_step, predict_naive
from learndyn.dynamics.updates import OptimizerRule
from learndyn.errors import LearndynError
from learndyn.losses import LOSSES, get_loss, names
from learndyn.probes.files import Probe

TYPES = ["grpo", "dr_grpo", "dapo", "bnpo"]
GROUPS = [  # one group without reward variance (no gradient), one with an unscorable completion
    Group("g0", "Human: How do I make tea? Assistant:", (" Boil the water.", " Steep it.", " No idea.", " Tea."),
          (1.0, 0.0, 0.0, 1.0)),
    Group("g1", [{"role": "user", "content": "What is a horseshoe?"}], (" A metal plate.", " A shoe.", " Iron."),
          (0.5, 0.5, 0.5)),
    Group("g2", "Human: Is the fox quick? Assistant:", (" Yes.", " It jumps over the lazy dog.", " No.", " Maybe"),
          (2.0, -1.0, None, 0.5)),
]
PROBES = [
    Probe("p0", "Human: How do I make tea? Assistant:", {"chosen": " Boil the water.", "rejected": " No idea."}),
    Probe("p1", [{"role": "user", "content": "Name a language."}], {"chosen": " Python is a language."}),
]


def _batch(sizes=(3, 5, 2, 4, 1), vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    logits = torch.randn(len(seq), vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (len(seq),), generator=g)
    return logits, labels, seq, len(sizes)


def plain_loss(name: str, logits, labels, seq, n_seq, adv, beta=0.0, ref=None, max_completion_length=8):
    """TRL's loss at the first iteration, one completion at a time: per token −A·ratio (+ β·k3)."""
    per_seq, lengths = [], []
    logp_all = torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels]
    for i in range(n_seq):
        logp = logp_all[seq == i]
        ratio = torch.exp(logp - logp.detach())
        per_token = -adv[i] * ratio
        if beta:
            d = ref[seq == i] - logp
            per_token = per_token + beta * (torch.exp(d) - d - 1)
        per_seq.append(per_token.sum())
        lengths.append(len(logp))
    total = torch.stack(per_seq)
    if name == "grpo":
        return (total / torch.tensor(lengths)).mean()
    if name == "dr_grpo":
        return total.sum() / (n_seq * max_completion_length)
    return total.sum() / sum(lengths)  # dapo, bnpo: one batch, one process


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_residual_equals_autograd_of_the_plain_loss(name, beta):
    logits, labels, seq, n_seq = _batch()
    adv, _ = advantages([Group("a", "p", ("x",) * 3, (1.0, 0.0, 0.0)), Group("b", "p", ("x",) * 2, (1.0, 1.0))])
    assert adv[3:].abs().max() == 0  # the group without variance
    ref = torch.log_softmax(torch.randn_like(logits), -1)[torch.arange(len(labels)), labels]
    terms = dict(advantages=adv, max_completion_length=8)
    z = logits.clone().requires_grad_()
    expected_value = plain_loss(name, z, labels, seq, n_seq, adv, beta, ref)
    (expected,) = torch.autograd.grad(expected_value, z)
    spec = LOSSES[name]
    got = residual(spec, logits, labels, seq, n_seq, beta=beta, ref_logps=ref, **terms)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss_value(spec, logits, labels, seq, n_seq, beta=beta, ref_logps=ref, **terms),
                               expected_value.detach(), rtol=1e-12, atol=1e-14)
    parts = residual_parts(spec, logits, labels, seq, n_seq, beta=beta, ref_logps=ref, **terms)
    assert list(parts) == ["positive", "negative", *(["kl"] if beta else [])]
    assert parts["positive"][seq >= 3].abs().max() == 0 and parts["negative"][seq >= 3].abs().max() == 0


def _trl_stub(name: str, beta: float, logits: torch.Tensor, max_completion_length: int):
    """A stand-in `self` for GRPOTrainer._compute_loss: its per-token log-probs come from `logits`
    (B, T, V) so autograd reaches them; everything else is GRPOConfig's defaults, one process."""
    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        ids = input_ids[:, -logits_to_keep:]
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]  # (B, T)
        return logp, torch.zeros_like(logp), None

    return SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=name, epsilon_low=0.2, epsilon_high=0.2,
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction="sum": x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_residual_equal_trls_own_compute_loss(name, beta):
    """TRL's GRPOTrainer._compute_loss, called on a stub trainer with right-padded completions."""
    from trl import GRPOTrainer
    from trl.trainer.utils import nanstd as trl_nanstd

    sizes = (3, 5, 2, 4)
    logits, labels, seq, n_seq = _batch(sizes)
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    groups = [Group("a", "p", ("x", "y"), (1.0, 0.0)), Group("b", "p", ("x", "y"), (3.0, 3.0))]
    adv, info = advantages(groups)
    trl_adv = (rewards - rewards.view(-1, 2).mean(1).repeat_interleave(2)) / (
        trl_nanstd(rewards.view(-1, 2), dim=1).repeat_interleave(2) + 1e-4)
    torch.testing.assert_close(adv, trl_adv.double(), rtol=1e-6, atol=1e-6)
    assert info["zero_variance_groups"] == 1
    width, vocab = max(sizes), logits.shape[1]
    padded = torch.zeros(n_seq, width, vocab, dtype=torch.float64)
    ids = torch.zeros(n_seq, width, dtype=torch.long)
    mask = torch.zeros(n_seq, width, dtype=torch.long)
    for i, n in enumerate(sizes):
        padded[i, :n], ids[i, :n], mask[i, :n] = logits[seq == i], labels[seq == i], 1
    ref_flat = torch.log_softmax(torch.randn_like(logits), -1)[torch.arange(len(labels)), labels]
    ref = torch.zeros(n_seq, width, dtype=torch.float64)
    for i, n in enumerate(sizes):
        ref[i, :n] = ref_flat[seq == i]
    z = padded.clone().requires_grad_()
    inputs = {"prompt_ids": torch.ones(n_seq, 2, dtype=torch.long), "prompt_mask": torch.ones(n_seq, 2, dtype=torch.long),
              "completion_ids": ids, "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": mask.sum(), "ref_per_token_logps": ref}
    trl_loss = GRPOTrainer._compute_loss(_trl_stub(name, beta, z, 6), None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, z)
    spec = get_loss(name, explained=True)
    terms = dict(beta=beta, ref_logps=ref_flat, advantages=adv, max_completion_length=6)
    torch.testing.assert_close(loss_value(spec, logits, labels, seq, n_seq, **terms), trl_loss.detach(),
                               rtol=1e-12, atol=1e-14)
    got = residual(spec, logits, labels, seq, n_seq, **terms)
    torch.testing.assert_close(got, torch.cat([trl_grad[i, :n] for i, n in enumerate(sizes)]), rtol=1e-10, atol=1e-14)


def test_advantages_follow_trl_for_every_scale():
    from trl.trainer.utils import nanstd as trl_nanstd

    rewards = torch.tensor([[1.0, 0.0, 2.0, math.nan], [0.5, 0.5, 0.5, 0.5], [3.0, -1.0, 0.0, 1.0]])
    groups = [Group(f"g{i}", "p", ("x",) * 4, tuple(None if math.isnan(r) else float(r) for r in row))
              for i, row in enumerate(rewards.tolist())]
    flat = rewards.view(-1)
    mean = torch.nanmean(rewards, dim=1).repeat_interleave(4)
    expected = {"group": (flat - mean) / (trl_nanstd(rewards, dim=1).repeat_interleave(4) + 1e-4),
                "batch": (flat - mean) / (trl_nanstd(flat) + 1e-4), "none": flat - mean}
    for scale, want in expected.items():
        got, info = advantages(groups, scale)
        torch.testing.assert_close(got, torch.nan_to_num(want, nan=0.0).double(), rtol=1e-6, atol=1e-6)
        assert got[3] == 0 and got[4:8].abs().max() == 0  # unscorable; a group without variance
        assert info["zero_variance_groups"] == 1


def _tiny64(request, fixture="tiny_gpt2"):
    model, tok = request.getfixturevalue(fixture)
    return model.double(), tok


def plain_step(model, tokenizer, name, lr, max_completion_length):
    """The loss written completion by completion (one plain forward each) and torch's SGD step."""
    seqs = encode_groups(GROUPS, tokenizer, max_length=None, max_completion_length=max_completion_length)
    adv, _ = advantages(GROUPS)
    logits, labels, seq = [], [], []
    for i, (ids, start) in enumerate(zip(seqs.ids, seqs.starts)):
        logits.append(model(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1])
        labels += ids[start:]
        seq += [i] * (len(ids) - start)
    loss = plain_loss(name, torch.cat(logits).double(), torch.tensor(labels), torch.tensor(seq), len(seqs.ids), adv,
                      max_completion_length=max_completion_length)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=lr).zero_grad()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return delta


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_delta_is_the_step_torch_takes_and_prediction_is_exact(request, name):
    """Δθ equals autograd + torch.optim.SGD on the plain loss; the prediction equals the per-probe
    backward route (exact on float64 GPT-2); the parts add up to it."""
    model, tok = _tiny64(request)
    got = explain_step(model, tok, GROUPS, PROBES, loss=name, rule=OptimizerRule("sgd", 1e-2), keep_delta=True,
                       max_completion_length=32)
    want = plain_step(model, tok, name, 1e-2, 32)
    for n, d in want.items():
        torch.testing.assert_close(got.delta[n], d, rtol=1e-9, atol=1e-14, msg=n)
    naive = predict_naive(model, tok, PROBES, got.delta).set_index(["example_id", "response_type"])["predicted"]
    ch = got.changes.set_index(["example_id", "response_type"])
    torch.testing.assert_close(torch.tensor(ch["predicted"].values), torch.tensor(naive.loc[ch.index].values),
                               rtol=1e-7, atol=1e-12)
    parts = ch["predicted_from_positive"] + ch["predicted_from_negative"] + ch["predicted_from_state"]
    torch.testing.assert_close(torch.tensor(parts.values), torch.tensor(ch["predicted"].values))
    assert "predicted_from_chosen" not in ch and "predicted_from_kl" not in ch
    update = got.summary["update"]
    assert update["zero_variance_groups"] == 1 and got.summary["beta"] == 0.0
    assert [s["advantage"] for s in update["sequences"]][4:7] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_prediction_matches_the_actual_change_to_first_order(request, fixture):
    model, tok = _tiny64(request, fixture)
    errors = [explain_step(model, tok, GROUPS, PROBES, loss="dapo", rule=OptimizerRule("sgd", lr))
              .summary["relative_error"] for lr in (1e-2, 1e-3)]
    assert errors[0] < 0.05  # measured: 0.018 (GPT-2), 0.002 (Llama)
    assert 5 < errors[0] / errors[1] < 20  # O(η) relative


def test_kl_part_is_zero_without_a_reference_and_pulls_back_with_one(request):
    model, tok = _tiny64(request)
    same = explain_step(model, tok, GROUPS, PROBES, loss="grpo", beta=0.1, rule=OptimizerRule("sgd", 1e-2)).changes
    assert same["predicted_from_kl"].abs().max() == 0  # π_ref = π: the first step
    other = type(model)(model.config).double().eval()
    moved = explain_step(model, tok, GROUPS, PROBES, loss="grpo", beta=0.1, ref_model=other,
                         rule=OptimizerRule("sgd", 1e-2)).changes
    assert moved["predicted_from_kl"].abs().max() > 0
    parts = moved["predicted_from_positive"] + moved["predicted_from_negative"] + moved["predicted_from_kl"]
    torch.testing.assert_close(torch.tensor(parts.values), torch.tensor(moved["predicted"].values))


@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_zeroing_one_sign_of_advantage_zeroes_its_part_only(request, monkeypatch, sign):
    """With SGD (no clipping) each part is linear in its own advantages: zero those of one sign and
    that part vanishes while the other part stays exactly as it was."""
    import learndyn.dynamics.step as step

    model, tok = _tiny64(request)
    rule = OptimizerRule("sgd", 1e-2)
    full = explain_step(model, tok, GROUPS, PROBES, loss="grpo", rule=rule).changes
    real = step.advantages

    def one_sign(groups, scale):
        adv, info = real(groups, scale)
        return (adv.clamp(max=0) if sign == "positive" else adv.clamp(min=0)), info

    monkeypatch.setattr(step, "advantages", one_sign)
    cut = explain_step(model, tok, GROUPS, PROBES, loss="grpo", rule=rule).changes
    other = "negative" if sign == "positive" else "positive"
    assert (cut[f"predicted_from_{sign}"] == 0).all() and (full[f"predicted_from_{sign}"] != 0).all()
    torch.testing.assert_close(torch.tensor(cut[f"predicted_from_{other}"].values),
                               torch.tensor(full[f"predicted_from_{other}"].values), rtol=1e-9, atol=1e-14)


def test_bad_groups_give_one_line_errors(request):
    model, tok = _tiny64(request)
    with pytest.raises(LearndynError, match="3 completions but 2 rewards"):
        Group("x", "p", ("a", "b", "c"), (1.0, 0.0))
    with pytest.raises(LearndynError, match="groups of completions"):
        explain_step(model, tok, [Preference("x", "p", "a", "b")], PROBES, loss="grpo")
    with pytest.raises(LearndynError, match="more than max_completion_length 2"):
        explain_step(model, tok, GROUPS, PROBES, loss="dapo", max_completion_length=2)
    with pytest.raises(LearndynError, match="dr_grpo divides by max_completion_length"):
        explain_step(model, tok, GROUPS, PROBES, loss="dr_grpo")
    with pytest.raises(LearndynError, match="explain does not support loss 'cispo'; valid: .*dapo, grpo, dr_grpo, bnpo$"):
        get_loss("cispo", explained=True)
    assert names(policy_gradient=True)[:4] == ["dapo", "grpo", "dr_grpo", "bnpo"]
    assert "grpo" not in names(pairwise=True) and "grpo" not in names(explained=True, policy_gradient=False)


def _settings(tmp_path, **kw):
    from learndyn.experiments.explain import ExplainSettings
    from learndyn.probes.files import write_probes

    write_probes(PROBES, tmp_path / "probes.jsonl")
    return ExplainSettings(probes=str(tmp_path / "probes.jsonl"), **kw)


def test_settings_refuse_grpo_without_completions_or_reward(tmp_path):
    from learndyn.experiments.explain import run_explain

    settings = _settings(tmp_path, update="example", loss="grpo", model="no-such-model-is-loaded")
    assert settings.beta == 0.0 and _settings(tmp_path, update="example", loss="sigmoid").beta == 0.1
    with pytest.raises(LearndynError, match=r"^loss grpo: update row 'ex-001' has no `completions` and `rewards` "
                                            r"columns; give --reward"):
        run_explain(settings, tmp_path / "out")
    with pytest.raises(LearndynError, match="--num-generations must be at least 2"):
        _settings(tmp_path, update="example", loss="grpo", num_generations=1)
    with pytest.raises(LearndynError, match="--reward scores GRPO completions"):
        _settings(tmp_path, update="example", loss="sigmoid", reward="arithmetic")
    with pytest.raises(LearndynError, match="unknown --scale-rewards 'std'"):
        _settings(tmp_path, update="example", loss="dapo", scale_rewards="std")


REWARDS = '''
def length(prompts, completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]

def broken(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
'''


def test_sampled_groups_are_scored_and_a_nan_reward_is_one_line(tiny_folder, tmp_path, monkeypatch):
    from learndyn.experiments.explain import run_explain
    from learndyn.rewards import RewardError

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = _settings(tmp_path, update="arithmetic[0:2]", rows=(0, 1), loss="dapo", model=str(tiny_folder),
                         reward="my_rewards:length", num_generations=3, max_new_tokens=8, lr=1e-3)
    result = run_explain(settings, tmp_path / "out", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "group.jsonl").read_text().splitlines()]
    assert [(r["example_id"], r["completion"]) for r in lines] == [(e, j) for e in ("arith-0-00000", "arith-0-00001")
                                                                    for j in range(3)]
    assert all(r["sampled"] and r["reward"] == len(r["text"]) and r["n_tokens"] <= 8 for r in lines)
    assert result.summary["update"]["max_completion_length"] == 8
    again = run_explain(settings, tmp_path / "again", progress=False)  # seeded: the same samples
    assert (tmp_path / "again" / "group.jsonl").read_text() == (tmp_path / "out" / "group.jsonl").read_text()
    assert again.summary["relative_error"] == result.summary["relative_error"]
    broken = _settings(tmp_path, update="arithmetic[0:2]", loss="dapo", model=str(tiny_folder),
                       reward="my_rewards:broken", max_new_tokens=4)
    with pytest.raises(RewardError, match="^--reward my_rewards:broken: reward nan for completion 0; rewards must be finite$"):
        run_explain(broken, tmp_path / "broken", progress=False)


def test_cli_explains_a_grpo_step_on_given_completions(tiny_folder, tmp_path):
    from test_cli import learndyn

    import pandas as pd

    from learndyn.probes.files import write_probes

    update = tmp_path / "groups.jsonl"
    rows = [{"example_id": g.example_id, "prompt": g.prompt, "chosen": g.completions[0],
             "completions": list(g.completions), "rewards": list(g.rewards)} for g in GROUPS]
    update.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write_probes(PROBES, tmp_path / "probes.jsonl")
    out = tmp_path / "explained"
    result = learndyn("explain", "--update", str(update), "--rows", "0,1,2", "--probes", str(tmp_path / "probes.jsonl"),
                      "--model", str(tiny_folder), "--loss", "grpo", "--lr", "1e-3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "after one grpo step" in result.stdout and "1 group(s)" in result.stdout
    changes = pd.read_parquet(out / "changes.parquet")
    assert {"predicted_from_positive", "predicted_from_negative", "predicted_from_state"} <= set(changes.columns)
    assert "predicted_from_chosen" not in changes.columns
    group = [json.loads(line) for line in (out / "group.jsonl").read_text().splitlines()]
    assert len(group) == 11 and not any(r["sampled"] for r in group)
    assert [r["reward"] for r in group[4:7]] == [0.5] * 3 and all(r["advantage"] == 0 for r in group[4:7])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["update"]["zero_variance_groups"] == 1 and summary["settings"]["beta"] == 0.0
    assert summary["relative_error"] < 0.1
    assert (out / "changes.png").stat().st_size > 0
    missing = learndyn("explain", "--update", "example", "--probes", str(tmp_path / "probes.jsonl"), "--model",
                       str(tiny_folder), "--loss", "grpo", "--out", str(tmp_path / "none"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "give --reward" in missing.stderr
