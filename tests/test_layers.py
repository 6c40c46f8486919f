"""The layers (pyproject.toml [tool.importlinter]): every import of the package points down
errors < runtime/io/ranges < data < models < mi < config < method < eval < train < bench < cli,
imports inside
functions and under TYPE_CHECKING included, and no module of a package imports one that imports
it back. Checked by import-linter on the source these tests import."""

import os
import subprocess
import sys
from pathlib import Path

import m3i

ROOT = Path(__file__).resolve().parents[1]
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filenames=(sys.argv[1],), no_cache=True, no_logo=True))"
)


def test_every_import_points_down_the_layers_without_cycles():
    source = Path(m3i.__file__).resolve().parents[1]  # the src/ directory under test
    env = {**os.environ, "PYTHONPATH": str(source)}
    result = subprocess.run(
        [sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
