"""`ctprune sensitivity`: per-group curves of a briefly trained tiny model on training images of
the synthetic benchmark, monotone within noise; the scan is cached, resumed when new ratios are
asked for, restarted when its settings change; its table, plot and CLI."""

import json

import pytest
import torch
from tiny import TINY_HEAD_CONV, TINY_WIDTHS

from ctprune.cli import main
from ctprune.sensitivity import PLOT_FILE, SCAN_FILE, TABLE_FILE, calibration_split, scan
from detector import ModelConfig, input_preset, save_checkpoint
from detector.checkpoint import build_from_config
from detector.data.dataset import CenterNetDataset, collate
from detector.data.shapes import generate_shapes
from detector.losses import centernet_loss

pytestmark = pytest.mark.timeout(120)

# A curve may dip from one ratio to the next by this fraction of the scan's largest loss
# without counting as non-monotone (measured on this model: two residual streams of 8 and 16
# channels dip by 0.0012 and 0.0010 against a largest loss of 0.35; the removed channels'
# contributions partly cancel).
NOISE = 0.05


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny res18 trained for 30 steps on 16 shapes images (64 px), saved as a checkpoint."""
    root = tmp_path_factory.mktemp("sensitivity")
    generate_shapes(root / "shapes", num_train=16, num_val=4, image_size=64, seed=7,
                    progress=False)
    data = root / "shapes" / "data.yaml"
    source = calibration_split(data, 16, 0)
    config = ModelConfig(arch="res18", num_classes=len(source.class_names),
                         head_conv=TINY_HEAD_CONV, widths=TINY_WIDTHS["res"],
                         input=input_preset("imagenet", (64, 64)),
                         class_names=list(source.class_names))
    torch.manual_seed(0)
    model = build_from_config(config)
    dataset = CenterNetDataset(source.records, config.num_classes, config.input, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collate)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(15):
        for batch in loader:
            loss, _ = centernet_loss(model(batch["image"]), batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    path = save_checkpoint(root / "model.pt", model.eval(), config)
    return path, data


def test_drift_curves_are_monotone_within_noise_and_cached(trained, tmp_path):
    checkpoint, data = trained
    out = tmp_path / "scan"
    result = scan(checkpoint, data, out, ratios=(0.25, 0.5), images=4, measure="drift",
                  progress=False)
    assert result["complete"] and result["measured"] == 2 * len(result["groups"])
    checked = 0
    noise = NOISE * max(point["loss"] for entry in result["groups"].values()
                        for point in entry["points"].values())
    for name, entry in result["groups"].items():
        losses = [entry["points"][ratio]["loss"] for ratio in ("0.25", "0.5")]
        assert all(loss >= 0 for loss in losses), name
        assert losses[1] >= losses[0] - noise, (name, losses)
        checked += losses[1] > 0
    assert checked >= len(result["groups"]) - 1  # removing channels changes the outputs
    assert (out / TABLE_FILE).exists() and (out / PLOT_FILE).stat().st_size > 0
    # Cached: nothing is measured again; a new ratio measures only its own points (resumed).
    again = scan(checkpoint, data, out, ratios=(0.25, 0.5), images=4, measure="drift",
                 progress=False)
    assert again["measured"] == 0 and again["groups"] == result["groups"]
    more = scan(checkpoint, data, out, ratios=(0.25, 0.5, 0.75), images=4, measure="drift",
                progress=False)
    assert more["measured"] == len(result["groups"])
    for name, entry in more["groups"].items():
        losses = [entry["points"][ratio]["loss"] for ratio in ("0.25", "0.5", "0.75")]
        assert losses[2] >= losses[1] - noise, (name, losses)
    # Other settings start over.
    other = scan(checkpoint, data, out, ratios=(0.5,), images=4, measure="drift", seed=1,
                 progress=False)
    assert other["measured"] == len(result["groups"])
    assert json.loads((out / SCAN_FILE).read_text())["key"]["seed"] == 1


def test_an_interrupted_scan_continues(trained, tmp_path):
    checkpoint, data = trained
    out = tmp_path / "scan"
    stopped = scan(checkpoint, data, out, ratios=(0.5,), images=4, measure="drift",
                   budget_minutes=1e-9, progress=False)
    assert not stopped["complete"] and stopped["measured"] == 0
    finished = scan(checkpoint, data, out, ratios=(0.5,), images=4, measure="drift",
                    progress=False)
    assert finished["complete"] and finished["measured"] == len(finished["groups"])


def test_ap50_scan_through_the_cli(trained, tmp_path, capsys):
    checkpoint, data = trained
    out = tmp_path / "scan"
    assert main(["sensitivity", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--ratios", "0.75", "--images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "AP50 lost" in printed and "scan complete" in printed
    state = json.loads((out / SCAN_FILE).read_text())
    assert state["key"]["measure"] == "ap50" and 0 <= state["base"] <= 1
    for entry in state["groups"].values():
        point = entry["points"]["0.75"]
        assert point["loss"] == pytest.approx(state["base"] - point["value"])


def test_bad_scan_arguments_are_named(trained, tmp_path):
    checkpoint, data = trained
    with pytest.raises(ValueError, match="measure: expected one of"):
        scan(checkpoint, data, tmp_path, measure="ap")
    with pytest.raises(ValueError, match="criterion: expected one of l1, l2, bn_gamma, random"):
        scan(checkpoint, data, tmp_path, criterion="taylor")
    with pytest.raises(ValueError, match=r"ratios: expected values in \(0, 0.95\], got 1.0"):
        scan(checkpoint, data, tmp_path, ratios=(1.0,))


def test_cli_prune_calibrates_on_the_training_split(trained, tmp_path, capsys):
    from detector import count_macs, load_model

    checkpoint, data = trained
    out = tmp_path / "pruned.pt"
    common = ["prune", str(checkpoint), "--allocation", "sensitivity", "--target-macs", "0.6",
              "--round-to", "4", "--out", str(out), "--overwrite"]
    assert main([*common, "--criterion", "taylor", "--data", str(data)]) == 0
    parent, _ = load_model(checkpoint)
    pruned, _ = load_model(out)
    assert count_macs(pruned, (64, 64)) <= 0.6 * count_macs(parent, (64, 64))
    # From a stored scan: no data needed.
    scan(checkpoint, data, tmp_path / "scan", ratios=(0.25, 0.5), images=4, measure="drift",
         progress=False)
    assert main([*common, "--sensitivity", str(tmp_path / "scan" / SCAN_FILE)]) == 0
    capsys.readouterr()
    assert main([*common, "--criterion", "taylor"]) == 2
    assert "--data: the taylor criterion" in capsys.readouterr().err


def test_preflight_names_a_missing_scan(tmp_path):
    from ctprune.preflight import PreflightError, preflight
    from ctprune.recipe import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: scan\nmodel: {arch: res18}\ndata: data.yaml\n"
        "baseline: {checkpoint: base.pt}\nfinetune: {epochs: 1, lr_steps: []}\n"
        "prune: {ratio: null, target_macs: 0.5, allocation: sensitivity, "
        "sensitivity: missing.json}\n"
    )
    with pytest.raises(PreflightError, match=r"prune.sensitivity: .*missing.json does not exist"):
        preflight(load_recipe(recipe, check_files=False), tmp_path / "run", "cpu")
