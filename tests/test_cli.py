import subprocess
import sys

import pytest
import torch
from tiny import tiny_config

from ctprune.cli import main
from detector import save_checkpoint
from detector.checkpoint import build_from_config


def test_info_describes_a_checkpoint(tmp_path, capsys):
    config = tiny_config()
    path = save_checkpoint(tmp_path / "m.pt", build_from_config(config), config, meta={"epoch": 2})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "arch         res18" in out and "unpruned" in out and "meta.epoch   2" in out
    assert "GMACs at 64x64" in out


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "missing.pt: no such checkpoint file" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "ctprune", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "import-original" in result.stdout


def test_import_original_command(tmp_path, capsys):
    from test_original import _original_checkpoint

    _, path = _original_checkpoint(tmp_path)
    out = tmp_path / "imported.pt"
    assert main(["import-original", str(path), "--arch", "res18", "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["model_config"]["input"]["color_order"] == "BGR"


def test_prune_command_writes_a_loadable_smaller_checkpoint(tmp_path, capsys):
    from detector import count_parameters, load_model

    config = tiny_config()
    path = save_checkpoint(tmp_path / "m.pt", build_from_config(config), config)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(path), "--ratio", "0.5", "--round-to", "0", "--out", str(out)]) == 0
    assert "| params (M) |" in capsys.readouterr().out
    pruned, checkpoint = load_model(out)
    assert checkpoint.channel_plan and count_parameters(pruned) < 0.5 * count_parameters(
        build_from_config(config)
    )
    with pytest.raises(SystemExit) as refused:  # argparse checks the range, naming --ratio
        main(["prune", str(path), "--ratio", "1.5", "--out", str(out)])
    assert refused.value.code == 2
    assert "ratio" in capsys.readouterr().err
