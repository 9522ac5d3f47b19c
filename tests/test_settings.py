"""Settings dataclasses are the one source of defaults and help: the CLI shows what the dataclass holds."""

from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from learndyn.settings import option_help, setting


@dataclass
class Example:
    lr: float = setting(2e-5, "Learning rate")
    epochs: float = setting(3.0, "Passes (over the data)")
    seed: int = setting(0, "Seed")
    name: str | None = setting(None, "Name")
    device: str | None = setting(None, "Device", shown="GPU if present")
    flag: bool = setting(False, "Flag")


def test_help_carries_the_dataclass_default_as_typed():
    assert option_help(Example, "lr") == "Learning rate (default 2e-5)."
    assert option_help(Example, "seed") == "Seed (default 0)."  # 0 is a default, not "no default"
    assert option_help(Example, "epochs") == "Passes (over the data; default 3)."
    assert option_help(Example, "epochs", quick={"epochs": 1.0}) == "Passes (over the data; default 3; 1 with --quick)."
    assert option_help(Example, "name") == "Name."
    assert option_help(Example, "flag") == "Flag."
    assert option_help(Example, "device") == "Device (default GPU if present)."
    with pytest.raises(KeyError, match="no setting 'nope'"):
        option_help(Example, "nope")


def _help(*command: str) -> str:
    import learndyn.cli

    output = CliRunner().invoke(learndyn.cli.app, [*command, "--help"], env={"COLUMNS": "400"}).output
    return " ".join(output.split())


def test_cli_help_follows_the_settings_dataclasses(monkeypatch):
    """A default changed in the dataclass shows in --help: nothing in the CLI restates it."""
    import importlib

    import learndyn.cli
    from learndyn.experiments.compare import CompareSettings
    from learndyn.experiments.explain import ExplainSettings
    from learndyn.training.recipes import TrainSettings

    assert ("Examples per optimizer step (per device; GRPO counts sampled completions, a multiple of "
            "--num-generations; default 8).") in " ".join(_help("train", "dpo").split())
    assert "SFT epochs (default 3; 2 with --quick)." in _help("compare")
    assert "default https://api.openai.com/v1" in _help("judge")
    for cls, name in ((TrainSettings, "every"), (CompareSettings, "sft_epochs"), (ExplainSettings, "lr")):
        monkeypatch.setattr(cls.__dataclass_fields__[name], "default", 0.37)
    try:
        importlib.reload(learndyn.cli)
        assert "Score probes every N optimizer steps (default 0.37)." in _help("train", "dpo")
        assert "SFT epochs (default 0.37; 2 with --quick)." in _help("compare")
        assert "Learning rate of the step (default 0.37)." in _help("explain")
    finally:
        monkeypatch.undo()
        importlib.reload(learndyn.cli)
