"""Strict recipe loading: dotted-path errors, --set overrides, the YAML float quirk."""

import pytest

from detector.config import ConfigError, InputSpec, ModelConfig, from_dict, parse_overrides, to_dict
from detector.engine.config import TrainConfig, TrainRecipe, load_train_recipe


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_full_recipe_loads(tmp_path):
    path = _write(
        tmp_path,
        "name: demo\n"
        "model: {arch: res18, input: {input_size: [128, 128]}}\n"
        "data: {format: coco, train: a.json, val: b.json, images: imgs}\n"
        "train: {epochs: 3, lr: 1e-4, lr_steps: [2], augment: {flip: 0.0}}\n"
        "evaluate: {flip: true}\n",
    )
    recipe = load_train_recipe(path)
    assert isinstance(recipe, TrainRecipe) and recipe.name == "demo"
    assert recipe.model.input.input_size == (128, 128)
    assert recipe.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string; floats accept it
    assert recipe.train.augment.flip == 0.0 and recipe.evaluate.flip
    assert recipe.data.root == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lr: fast}\n", "train.lr: expected float, got 'fast'"),
        ("train: {epochs: 2.5}\n", "train.epochs: expected int, got 2.5"),
        ("train: {amp: true}\n", "train: unknown keys \\['amp'\\]"),
        ("trian: {lr: 1.0}\n", "recipe: unknown keys \\['trian'\\]"),
        ("train: {optimizer: lamb}\n", "train.optimizer: expected 'adam' or 'sgd', got 'lamb'"),
        ("train: {augment: {flip: 2}}\n", "train.augment.flip: expected a probability"),
        ("model: {input: {std: [0, 1, 1]}}\n", "model.input.std: expected positive"),
        ("model: {input: {color_order: RGBA}}\n", "model.input.color_order"),
        ("train: {lr_steps: 5}\n", "train.lr_steps: expected a list, got 5"),
        ("train: {batch_size: 0}\n", "train.batch_size: expected an integer >= 1"),
        ("train: {deterministic: 'yes'}\n", "train.deterministic: expected bool"),
        ("- a list\n", "expected a mapping of sections"),
    ],
)
def test_mistakes_name_the_dotted_path(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_train_recipe(_write(tmp_path, text))


def test_overrides_win_and_are_typed(tmp_path):
    path = _write(tmp_path, "train: {epochs: 3, lr: 1.0e-4}\n")
    recipe = load_train_recipe(path, ["train.epochs=7", "train.lr=2e-3", "model.arch=res50",
                                      "train.augment.color=false", "evaluate.scales=[1, 1.5]"])
    assert (recipe.train.epochs, recipe.train.lr, recipe.model.arch) == (7, 2e-3, "res50")
    assert recipe.train.augment.color is False and recipe.evaluate.scales == [1.0, 1.5]
    with pytest.raises(ConfigError, match="train.epochs: expected int, got 'many'"):
        load_train_recipe(path, ["train.epochs=many"])


@pytest.mark.parametrize("override", ["epochs=3", "train.epochs", "=3"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        load_train_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_recipe(_write(tmp_path, "train: {lr: [\n"))


def test_round_trip_through_plain_data():
    config = TrainConfig(epochs=4, lr_steps=[3.0])
    assert from_dict(TrainConfig, to_dict(config), "train") == config
    model = ModelConfig(arch="res50", num_classes=5, input=InputSpec(input_size=(256, 320)))
    assert from_dict(ModelConfig, to_dict(model), "model") == model


def test_linear_lr_scaling():
    assert TrainConfig(batch_size=128, lr=1.25e-4).scaled_lr() == pytest.approx(5e-4)
