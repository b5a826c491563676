"""`ctprune train` with a `sparsity` section: the switch that turns on slimming's sparsity
training."""

import pytest
import yaml
from tiny import TINY_HEAD_CONV, TINY_WIDTHS

from ctprune.cli import main
from ctprune.pruning.slimming import bn_gamma_statistics
from ctprune.recipe import load_recipe
from detector import load_model
from detector.data.shapes import generate_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=32, num_val=8, image_size=64, seed=3, progress=False)
    return root


def _recipe(tmp_path, shapes, sparsity=None, name="recipe"):
    recipe = {
        "name": "sparse",
        "model": {"arch": "res18", "head_conv": TINY_HEAD_CONV, "widths": TINY_WIDTHS["res"],
                  "input": {"input_size": [64, 64]}},
        "data": str(shapes / "data.yaml"),
        # 12 steps at lr 0.05 x 8 / 32: a proximal budget of 12 x 0.0125 x 20 = 3 > gamma = 1.
        "train": {"epochs": 3, "batch_size": 8, "lr": 0.05, "lr_steps": [], "workers": 0,
                  "eval_interval": 0},
    }
    if sparsity is not None:
        recipe["sparsity"] = sparsity
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _share_near_zero(checkpoint):
    model, _ = load_model(checkpoint)
    return bn_gamma_statistics(model)["share_below_threshold"]


def test_sparsity_section_turns_on_sparsity_training(tmp_path, shapes, capsys):
    dense_recipe = _recipe(tmp_path, shapes, name="dense")
    sparse_recipe = _recipe(
        tmp_path, shapes, {"method": "proximal", "strength": 20.0}, name="sparse"
    )
    main(["train", str(dense_recipe), "--out", str(tmp_path / "dense_run")])
    main(["train", str(sparse_recipe), "--out", str(tmp_path / "sparse_run")])
    dense = _share_near_zero(tmp_path / "dense_run" / "last.pt")
    sparse = _share_near_zero(tmp_path / "sparse_run" / "last.pt")
    assert dense < 0.05 and sparse > dense + 0.5


def test_sparsity_section_is_strict(tmp_path, shapes, capsys):
    path = _recipe(tmp_path, shapes, {"method": "l2"})
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "sparsity.method: expected 'l1' or 'proximal', got 'l2'" in capsys.readouterr().err
    recipe = load_recipe(_recipe(tmp_path, shapes))
    assert recipe.sparsity is None and recipe.prune is None and recipe.name == "sparse"
