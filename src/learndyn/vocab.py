"""The probe vocabulary: the names every file, table and plot uses for the kinds of response.

See DESIGN.md ("Probe vocabulary"). The paper's authors used other column names in their HH probe
file; `AUTHOR_COLUMNS` maps them to ours so their file reads as is.
"""

from __future__ import annotations

from typing import NoReturn

# name -> (paper symbol, how it is made)
RESPONSE_TYPES: dict[str, tuple[str, str]] = {
    "chosen": ("y_u+", "the dataset's preferred response"),
    "rejected": ("y_u-", "the dataset's dispreferred response"),
    "chosen_semantic": ("y_gpts+", "chosen reworded, same meaning"),
    "chosen_format": ("y_gptf+", "chosen's format, meaning changed"),
    "rejected_semantic": ("y_gpts-", "rejected reworded, same meaning"),
    "rejected_format": ("y_gptf-", "rejected's format, meaning changed"),
    "other_train": ("y_{j!=u}+", "chosen response of another training prompt"),
    "other_test": ("y_test+", "chosen response of a held-out prompt"),
    "fluent_random": ("y_hum", "a fluent sentence unrelated to the prompt"),
    "shuffled_chosen": ("y_urnd", "the words of chosen, shuffled"),
    "shuffled_other": ("y_rnd", "the words of another response, shuffled"),
    "base_sample": ("y_init", "a sample from a base model"),
    "greedy": ("y*", "the model's own greedy decode at the start of a run"),
    "sample_rewarded": ("y_s+", "the model's own sample at the start of the run that the reward scored highest"),
    "sample_unrewarded": ("y_s-", "the model's own sample at the start of the run that the reward scored lowest"),
}
TYPE_NAMES: tuple[str, ...] = tuple(RESPONSE_TYPES)
REPHRASE_TYPES: tuple[str, ...] = ("chosen_semantic", "chosen_format", "rejected_semantic", "rejected_format")

AUTHOR_COLUMNS: dict[str, str] = {
    "chosen_gptsemantic": "chosen_semantic",
    "chosen_gptformat": "chosen_format",
    "reject_gptsemantic": "rejected_semantic",
    "reject_gptformat": "rejected_format",
    "irr_train": "other_train",
    "irr_test": "other_test",
    "irr_hum": "fluent_random",
    "random_permute": "shuffled_chosen",
    "random_nonhum": "shuffled_other",
    "chosen_initial": "base_sample",
}
# Columns of the authors' file that are not probes (a noisy self-rephrase they never measured).
IGNORED_COLUMNS: frozenset[str] = frozenset({"chosen_selfr"})


def canonical_type(column: str) -> str | None:
    """Our name for a column (ours or the authors'), or None if it is not a response type."""
    if column in RESPONSE_TYPES:
        return column
    return AUTHOR_COLUMNS.get(column)


def check_types(names: list[str] | tuple[str, ...]) -> list[str]:
    """Validate user-given response type names, accepting the authors' aliases."""
    out = []
    for name in names:
        canon = canonical_type(name)
        if canon is None:
            raise_unknown_type(name)
        out.append(canon)
    return out


def raise_unknown_type(name: str, where: str = "") -> NoReturn:
    from learndyn.errors import LearndynError

    prefix = f"{where}: " if where else ""
    raise LearndynError(f"{prefix}unknown response type '{name}'; valid: {', '.join(TYPE_NAMES)}")
