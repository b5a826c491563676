"""Training and evaluation end to end on a tiny synthetic data set, the Predictor and the CLI."""

import json

import numpy as np
import pytest
import yaml
from tiny import TINY_HEAD_CONV, TINY_WIDTHS

from ctprune.cli import main
from detector import load_model
from detector.config import ConfigError
from detector.data.shapes import generate_shapes
from detector.data.sources import load_data_yaml, load_source
from detector.engine.config import load_train_recipe
from detector.engine.train import train_from_recipe
from detector.evaluate.config import EvaluateConfig
from detector.evaluate.run import evaluate_model
from detector.inference.predictor import Predictor


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=32, num_val=8, image_size=64, seed=3)
    return root


def _recipe(tmp_path, shapes, **train):
    settings = {"epochs": 2, "batch_size": 8, "lr": 2e-3, "workers": 0, "eval_interval": 1,
                "lr_steps": [], **train}
    recipe = {
        "name": "tiny",
        "model": {"arch": "res18", "head_conv": TINY_HEAD_CONV, "widths": TINY_WIDTHS["res"],
                  "input": {"input_size": [64, 64]}},
        "data": str(shapes / "data.yaml"),
        "train": settings,
        "evaluate": {"batch_size": 8, "workers": 0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    out_dir = tmp_path_factory.mktemp("run")
    recipe = load_train_recipe(_recipe(out_dir, shapes))
    result = train_from_recipe(recipe, out_dir / "run", device="cpu")
    return out_dir / "run", result


def test_training_writes_checkpoints_metrics_and_reports(trained):
    run, result = trained
    assert result.epochs == 2 and result.best_epoch in (1, 2)
    for name in ("last.pt", "best.pt", "resume.pt", "metrics.jsonl", "recipe.yaml"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"ap", "ap50", "ap75", "voc_ap50", "loss", "per_class_ap"} <= set(metrics)
    assert len(list((run / "eval" / "pr_curves").glob("*.png"))) == 6
    model, checkpoint = load_model(run / "last.pt")
    assert checkpoint.model_config.num_classes == 6
    assert checkpoint.model_config.class_names[0] == "circle"
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["model"]["num_classes"] == 6


def test_predictor_gives_boxes_in_image_pixels_with_names(trained, shapes):
    run, _ = trained
    predictor = Predictor.from_checkpoint(run / "last.pt", device="cpu", flip=True)
    image = sorted((shapes / "images" / "val").iterdir())[0]
    [result] = predictor.predict([image])
    assert result.boxes.shape == (100, 4) and len(result.names) == 100
    assert np.all(np.diff(result.scores) <= 0)
    assert set(result.names) <= set(predictor.class_names)
    multi = Predictor.from_checkpoint(run / "last.pt", device="cpu", scales=(0.75, 1.0))
    assert len(multi.predict([image], score_threshold=0.0)[0].scores) <= 100


def test_evaluation_options_run(trained, shapes):
    run, _ = trained
    model, checkpoint = load_model(run / "last.pt")
    source = load_source(load_data_yaml(shapes / "data.yaml"), "val")
    for config in (
        EvaluateConfig(flip=True, workers=0),
        EvaluateConfig(scales=[0.5, 1.0], workers=0),
        EvaluateConfig(keep_resolution=True, workers=0),
    ):
        metrics = evaluate_model(model, source, checkpoint.model_config, config, "cpu")
        assert 0.0 <= metrics["ap50"] <= 1.0


def test_cli_eval_detect_show_data_and_info(trained, shapes, tmp_path, capsys):
    run, _ = trained
    assert main(["eval", str(run / "best.pt"), "--data", str(shapes / "data.yaml"),
                 "--out", str(tmp_path / "eval"), "--set", "evaluate.workers=0"]) == 0
    assert "ap50" in capsys.readouterr().out
    assert (tmp_path / "eval" / "per_class_ap.md").is_file()
    image = sorted((shapes / "images" / "val").iterdir())[0]
    assert main(["detect", str(run / "best.pt"), str(image), "--out", str(tmp_path / "det"),
                 "--threshold", "0.0", "--show-heatmap"]) == 0
    assert len(list((tmp_path / "det").glob("*.png"))) == 2
    assert (
        main(
            ["show-data", str(shapes / "data.yaml"), "--out", str(tmp_path / "gt"), "--count", "2"]
        )
        == 0
    )
    assert len(list((tmp_path / "gt").glob("*.png"))) == 2
    assert main(["info", str(run / "best.pt")]) == 0


def test_cli_train_resume_and_overrides(shapes, tmp_path, capsys):
    recipe = _recipe(tmp_path, shapes, epochs=1, eval_interval=0)
    out = tmp_path / "cli_run"
    assert main(["train", str(recipe), "--out", str(out)]) == 0
    assert (
        main(["train", str(recipe), "--out", str(out), "--resume", "--set", "train.epochs=2"]) == 0
    )
    assert "trained 2 epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=64", "batch_size is 64 but the training set has only 32 images"),
        ("model.num_classes=3", "model.num_classes is 3 but the data has 6 classes"),
        ("train.lr=fast", "train.lr: expected float"),
    ],
)
def test_bad_recipes_fail_before_training(shapes, tmp_path, override, message, capsys):
    recipe = _recipe(tmp_path, shapes)
    assert main(["train", str(recipe), "--out", str(tmp_path / "x"), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_missing_data_path_is_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: nowhere/data.yaml\n")
    with pytest.raises((ConfigError, FileNotFoundError), match="nowhere"):
        load_train_recipe(recipe)
