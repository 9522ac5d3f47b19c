"""Settings dataclasses are the one source of a setting's default and its help text.

A field is declared with `setting(default, "help")`; the CLI builds its option help with
`option_help(Settings, "field")`, which appends the default read from the dataclass, so a default
changed in one place shows everywhere (library, YAML config, `--help`). No heavy imports: `cli.py`
calls this while `learndyn --help` is being built.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any

__all__ = ["setting", "option_help"]


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, shown: str | None = None) -> Any:
    """A dataclass field with its help; `shown` replaces the printed default (e.g. "2e-5 SFT, 5e-6 DPO")."""
    metadata = {"help": help, **({"shown": shown} if shown is not None else {})}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_help(cls: type, name: str, quick: dict[str, Any] | None = None) -> str:
    """The field's help and its default, e.g. "DPO beta (default 0.1)"; with `quick` (the values a
    --quick preset overrides), "(default 32; 16 with --quick)"."""
    by_name: dict[str, Field] = {f.name: f for f in fields(cls)}
    if name not in by_name:
        raise KeyError(f"{cls.__name__} has no setting '{name}'")
    spec = by_name[name]
    text = spec.metadata.get("help", "")
    shown = spec.metadata.get("shown")
    if shown is None and not (spec.default is MISSING or spec.default is None or spec.default is False
                              or spec.default == ""):
        shown = _plain(spec.default)
    if shown is not None and quick and name in quick:
        shown = f"{shown}; {_plain(quick[name])} with --quick"
    if shown is None:
        return f"{text}."
    if text.endswith(")"):  # "Longest response (--on-policy; default 64)."
        return f"{text[:-1]}; default {shown})."
    return f"{text} (default {shown})."


def _plain(value: Any) -> str:
    """3.0 reads "3", 5e-05 reads "5e-5", as a user would type them."""
    if isinstance(value, float):
        if 0 < abs(value) < 1e-3:
            mantissa, _, exponent = f"{value:e}".partition("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    return str(value)
