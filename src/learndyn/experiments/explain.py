"""`learndyn explain`: one update step explained against a probe set, written to a folder.

Loads the model, the update rows and the probes, runs `dynamics.step.explain_step`, and writes
OUT/changes.parquet (one row per (example_id, response_type)), OUT/positions.parquet (one row per
response token, streamed chunk by chunk so that no probe set is too big for memory; see
`dynamics.positions` for its row order), OUT/summary.json (settings and headline numbers) and
OUT/changes.png, OUT/squeeze.png, each atomically. With `on_policy`, each update row's rejected response is replaced
by the model's own greedy response: a peak of the model's distribution instead of (usually) a
valley, which is how the paper contrasts on- and off-policy negatives.

With a GRPO loss type (grpo, dr_grpo, dapo, bnpo: TRL's GRPOTrainer loss_type) each update row is a
prompt and the step is GRPO's first step on its group: the row's `completions` (texts) and `rewards`
columns where it has them (without rewards, the completions are scored by `reward`), else
`num_generations` completions sampled from the model (temperature 1, up to `max_new_tokens`
tokens, seeded; the step trains on the sampled token ids, as TRL does) and scored by `reward` (`learndyn.rewards.load_reward`), called as TRL calls it:
prompts, completions (assistant messages for a chat prompt), completion_ids and the row's other
columns. OUT/group.jsonl holds what the step trained on, one line per completion: its text, reward,
advantage, tokens and log-probability, and whether it was sampled. changes.parquet then splits the
prediction into predicted_from_positive (completions with positive advantage), predicted_from_negative
(negative advantage), predicted_from_kl (with beta > 0) and predicted_from_state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from learndyn.atomic import atomic_path, write_json
from learndyn.errors import LearndynError
from learndyn.losses import SCALE_REWARDS, get_loss
from learndyn.memory import reporting_oom
from learndyn.models import BUILTIN_MODEL
from learndyn.settings import setting


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain; saved in summary.json."""

    update: str = setting(help="Preference data holding the update batch (any format `probes build` reads)")
    probes: str = setting(help="Probe file whose responses are explained")
    model: str = setting(BUILTIN_MODEL, "Model, before the step")
    rows: tuple[int, ...] = setting((0,), "Rows of UPDATE that form the batch, numbered from 0: '0' or '0,3'",
                                    shown="0")
    loss: str = setting("sft", "Loss of the step (TRL's names: DPO's loss_type, dpo = sigmoid; GRPO's loss_type)")
    optimizer: str = setting("sgd", "sgd, adam, adamw or rmsprop (fresh state)")
    lr: float = setting(1e-4, "Learning rate of the step")
    weight_decay: float = setting(0.0, "Weight decay (decoupled for adamw, L2 otherwise, as torch.optim)")
    max_grad_norm: float | None = setting(1.0, "Clip the gradient's norm first, as the transformers Trainer does; "
                                               "0: no clipping")
    beta: float | None = setting(None, "beta of the preference losses; of GRPO's KL term", shown="0.1; 0 for GRPO, "
                                 "as TRL")
    ref_model: str | None = setting(None, "Reference model of the preference losses and GRPO's KL term",
                                    shown="the model itself")
    reward: str | None = setting(None, "GRPO: the reward scoring completions (arithmetic, reward:MODEL or "
                                       "MODULE:FUNCTION); needed unless UPDATE's rows carry completions and rewards")
    num_generations: int = setting(4, "GRPO: completions sampled per prompt (TRL's num_generations)")
    max_new_tokens: int = setting(64, "GRPO: longest sampled completion, in tokens (TRL's max_completion_length, "
                                      "which dr_grpo divides by)")
    scale_rewards: str = setting("group", "GRPO: the reward std each advantage is divided by, the group's, the "
                                          "batch's or none (TRL's scale_rewards: group, batch, none)")
    seed: int = setting(0, "GRPO: seed of the sampled completions")
    on_policy: bool = setting(False, "Use the model's own greedy response as each row's rejected response")
    types: tuple[str, ...] | None = setting(None, "Only these response types, comma-separated", shown="all")
    probe_limit: int | None = setting(None, "Use only the first N probe rows")
    chunk_tokens: int = setting(1024, "Probe tokens per pass; lower it if memory runs short")
    max_length: int | None = setting(None, "The training run's max_length: the update and the probes are cut as "
                                           "`train` cuts them", shown="no cut within the model's context")
    greedy_tokens: int = setting(64, "Longest greedy response of --on-policy, in tokens")
    device: str | None = setting(None, "cpu, cuda, cuda:1, ...", shown="GPU if present")
    dtype: str | None = setting("float32", "float32 (first-order agreement needs it) or bfloat16")
    tokenizer: str | None = setting(None, "A tokenizer other than the model's own")

    def __post_init__(self) -> None:
        """Checked before any data or model loads: a loss explain lacks, a row named twice (it would
        count double in the step), options that the loss does not use; beta resolved to TRL's default."""
        loss = get_loss(self.loss, explained=True)
        if self.beta is None:
            object.__setattr__(self, "beta", loss.default_beta)
        if loss.policy_gradient:
            _check_grpo_options(self)
        elif self.reward is not None:
            raise LearndynError(f"--reward scores GRPO completions; loss {self.loss} trains on given responses "
                                "(use --loss grpo, dr_grpo, dapo or bnpo)")
        twice = next((row for i, row in enumerate(self.rows) if row in self.rows[:i]), None)
        if twice is not None:
            raise LearndynError(f"update rows {','.join(map(str, self.rows))}: row {twice} is named twice; "
                                "name each row once")


def _check_grpo_options(settings: ExplainSettings) -> None:
    if settings.on_policy:
        raise LearndynError(f"--on-policy replaces the rejected response of a preference pair; loss {settings.loss} "
                            "samples its own completions (--num-generations)")
    if settings.max_length is not None:
        raise LearndynError(f"loss {settings.loss}: GRPO cuts completions at --max-new-tokens, not at --max-length")
    if settings.num_generations < 2:
        raise LearndynError(f"--num-generations must be at least 2 (a group's advantages compare its completions), "
                            f"got {settings.num_generations}")
    if settings.max_new_tokens < 1:
        raise LearndynError(f"--max-new-tokens must be at least 1, got {settings.max_new_tokens}")
    if settings.scale_rewards not in SCALE_REWARDS:
        raise LearndynError(f"unknown --scale-rewards '{settings.scale_rewards}'; valid: {', '.join(SCALE_REWARDS)}")


def run_explain(settings: ExplainSettings, out: str | Path, progress: bool = True):
    """Explain the step and write the folder; returns the `Explanation` (its `positions` is the path
    of positions.parquet, written while the probes run)."""
    from learndyn.data import load_preferences
    from learndyn.dynamics.step import explain_step
    from learndyn.dynamics.updates import OptimizerRule
    from learndyn.models import load_model
    from learndyn.probes.files import read_probes

    loss = get_loss(settings.loss, explained=True)
    pairwise = loss.pairwise
    rule = OptimizerRule(settings.optimizer, settings.lr, weight_decay=settings.weight_decay,
                         max_grad_norm=settings.max_grad_norm)
    prefs = load_preferences(settings.update, need_rejected=pairwise and not settings.on_policy)
    update = pick_rows(prefs, settings.rows, settings.update)
    if loss.policy_gradient:
        check_scorable(update, settings)  # before the model loads
    probes = read_probes(settings.probes, limit=settings.probe_limit)
    # a LoRA model stays a peft model with only its adapter trainable: LoRA training moves the adapter
    # alone, so the step explained (and its Δθ) is over the adapter's parameters
    model, tokenizer = load_model(settings.model, device=settings.device, dtype=settings.dtype, adapter="train")
    if settings.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    ref = load_model(settings.ref_model, device=settings.device, dtype=settings.dtype)[0] if settings.ref_model else None
    if settings.on_policy:
        update = with_greedy_rejected(model, tokenizer, update, settings.greedy_tokens)
    groups = update_groups(model, tokenizer, update, settings) if loss.policy_gradient else None
    out = Path(out)
    with reporting_oom("explain"):
        result = explain_step(model, tokenizer, groups or update, probes, loss=loss, rule=rule, beta=settings.beta,
                              ref_model=ref, types=settings.types, chunk_tokens=settings.chunk_tokens,
                              max_length=settings.max_length, progress=progress,
                              scale_rewards=settings.scale_rewards, max_completion_length=settings.max_new_tokens,
                              positions_out=out / "positions.parquet")
    write_explanation(result, settings, update, out, groups)
    return result


def pick_rows(prefs: list, rows: tuple[int, ...], source: str) -> list:
    for row in rows:
        if not 0 <= row < len(prefs):
            raise LearndynError(f"{source}: row {row} does not exist (the data has {len(prefs)} rows, numbered from 0)")
    return [prefs[row] for row in rows]


def with_greedy_rejected(model, tokenizer, update: list, max_new_tokens: int) -> list:
    """The update rows with the model's own greedy response as the rejected one (on-policy)."""
    from dataclasses import replace

    from learndyn.generation import generate

    responses = generate(model, tokenizer, [p.prompt for p in update], max_new_tokens=max_new_tokens, progress=None)
    return [replace(p, rejected=r) for p, r in zip(update, responses)]


def update_groups(model, tokenizer, update: list, settings: ExplainSettings) -> list:
    """One `Group` per update row: its own completions and rewards where it has them, else sampled
    completions; completions without rewards are scored by `settings.reward`."""
    from learndyn.dynamics.groups import Group

    check_scorable(update, settings)
    given = {p.example_id: _given_completions(p) for p in update}
    to_sample = [p for p in update if given[p.example_id][0] is None]
    unscored = [p for p in update if given[p.example_id][1] is None]
    sampled = _sample(model, tokenizer, to_sample, settings) if to_sample else {}
    reward = None
    if unscored:
        from learndyn.rewards import load_reward

        reward = load_reward(settings.reward, device=settings.device)
    groups = []
    for pref in update:
        completions, rewards = given[pref.example_id]
        ids = None
        if completions is None:
            completions, ids = sampled[pref.example_id]
        if rewards is None:
            rewards = _score(reward, pref, completions, ids, tokenizer)
        groups.append(Group(pref.example_id, pref.prompt, tuple(completions), tuple(rewards),
                            None if ids is None else tuple(map(tuple, ids))))
    return groups


def check_scorable(update: list, settings: ExplainSettings) -> None:
    """Every row has its completions and rewards, or there is a reward to sample and score them with."""
    for pref in update:
        completions, rewards = _given_completions(pref)
        if rewards is None and settings.reward is None:
            what = "no `completions` and `rewards` columns" if completions is None else "no `rewards` column"
            raise LearndynError(f"loss {settings.loss}: update row '{pref.example_id}' has {what}; give --reward "
                                "(arithmetic, reward:MODEL or MODULE:FUNCTION) to sample --num-generations "
                                "completions per prompt and score them")


def _given_completions(pref) -> tuple[list[str] | None, list[float | None] | None]:
    """A row's own `completions` (texts, or assistant messages) and `rewards`, checked; None where absent."""
    from learndyn.data import plain_text

    columns = getattr(pref, "columns", {}) or {}
    completions, rewards = columns.get("completions"), columns.get("rewards")
    if completions is None:
        if rewards is not None:
            raise LearndynError(f"update row '{pref.example_id}' has rewards but no completions")
        return None, None
    if isinstance(completions, str) or not all(isinstance(c, (str, list)) for c in completions):
        raise LearndynError(f"update row '{pref.example_id}': `completions` must be a list of texts")
    texts = [plain_text(c) for c in completions]
    if rewards is None:
        return texts, None
    try:
        values = [None if r is None else float(r) for r in rewards]
    except (TypeError, ValueError):
        raise LearndynError(f"update row '{pref.example_id}': `rewards` must be a list of numbers") from None
    return texts, values


def _sample(model, tokenizer, prefs: list, settings: ExplainSettings) -> dict[str, tuple[list[str], list]]:
    """`num_generations` completions of each row's prompt, sampled at temperature 1 as GRPO does:
    (texts, token ids through EOS), the texts decoded as TRL decodes them for the reward."""
    from learndyn.generation import generate_tokens

    n = settings.num_generations
    prompts = [p.prompt for p in prefs for _ in range(n)]
    ids = generate_tokens(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens, do_sample=True,
                          temperature=1.0, seed=settings.seed, progress=None)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return {p.example_id: (texts[i * n:(i + 1) * n], ids[i * n:(i + 1) * n]) for i, p in enumerate(prefs)}


def _score(reward, pref, completions: list[str], ids: list | None, tokenizer) -> list[float | None]:
    """The rewards of one group, with the reward called as TRL's GRPOTrainer calls it."""
    n = len(completions)
    chat = not isinstance(pref.prompt, str)
    shown = [[{"role": "assistant", "content": c}] for c in completions] if chat else list(completions)
    columns = {k: [v] * n for k, v in (getattr(pref, "columns", {}) or {}).items()
               if k not in ("completions", "rewards", "prompts", "completion_ids")}
    ids = ids or [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    return reward(prompts=[pref.prompt] * n, completions=shown, completion_ids=ids, **columns)


def write_explanation(result, settings: ExplainSettings, update: list, out: Path, groups: list | None = None) -> None:
    from learndyn.report.explain_figures import changes_figure, png, squeeze_figure

    out.mkdir(parents=True, exist_ok=True)
    tables = [("changes", result.changes)]
    if not isinstance(result.positions, (str, Path)):  # in memory; streamed positions are written already
        tables.append(("positions", result.positions))
    for name, table in tables:
        with atomic_path(out / f"{name}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    for name, fig in (("changes", changes_figure(result.changes)), ("squeeze", squeeze_figure(result.changes))):
        with atomic_path(out / f"{name}.png") as tmp:
            tmp.write_bytes(png(fig))
    if groups is not None:
        rows = [{"example_id": g.example_id, "completions": len(g.completions)} for g in groups]
        _write_group(groups, result.summary["update"]["sequences"], out / "group.jsonl",
                     sampled={p.example_id for p in update if getattr(p, "columns", {}).get("completions") is None})
    else:
        rows = [{"example_id": p.example_id, "chosen": p.chosen, "rejected": p.rejected} for p in update]
    summary = {"settings": asdict(settings), "update_rows": rows, **result.summary}
    write_json(out / "summary.json", summary, indent=1)


def _write_group(groups: list, sequences: list[dict], path: Path, sampled: set[str]) -> None:
    """What the GRPO step trained on, one JSON line per completion, in the update's order."""
    import json

    lines = []
    flat = [(g, j, text, reward) for g in groups for j, (text, reward) in enumerate(zip(g.completions, g.rewards))]
    for (group, j, text, reward), seq in zip(flat, sequences, strict=True):
        lines.append(json.dumps({"example_id": group.example_id, "completion": j, "text": text, "reward": reward,
                                 "advantage": seq["advantage"], "n_tokens": seq["n_tokens"],
                                 "logp_sum": seq["logp_sum"], "sampled": group.example_id in sampled},
                                ensure_ascii=False))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
