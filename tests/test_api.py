"""The public API stays small, resolves lazily and keeps `import learndyn` free of torch."""

import subprocess
import sys

import learndyn


def test_every_public_name_resolves():
    for name in learndyn.__all__:
        assert getattr(learndyn, name) is not None, name


def test_import_does_not_load_torch():
    code = "import sys, learndyn; learndyn.LearndynError; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False"
