"""The console and the run's record: the per-epoch line, train.log, metrics.csv beside
metrics.jsonl, the TensorBoard writer's closing, and `ctprune --help` without torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORTED_AFTER = (
    "import sys\n"
    "from ctprune.cli import main\n"
    "try:\n"
    "    main([{argument!r}])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
)


def test_help_and_version_do_not_import_torch():
    for argument in ("--help", "--version"):
        completed = subprocess.run(
            [sys.executable, "-c", IMPORTED_AFTER.format(argument=argument)],
            capture_output=True, text=True, cwd=ROOT, check=True,
            env={"PYTHONPATH": str(ROOT), "PATH": ""},
        )
        assert completed.stdout.strip().splitlines()[-1] == "no torch", (argument, completed)
        assert "ctprune" in completed.stdout


def test_prune_defaults_are_valid_options():
    from ctprune.pruning.options import DEFAULTS, PruneOptions

    assert DEFAULTS == PruneOptions()
