"""Every numeric recipe key has its range checked when the recipe is read, before any work:
``section.key: expected <range>, got <value>``; the recipe name is a folder name; unreadable
recipe files and malformed ``--set`` overrides are named."""

import dataclasses
import json
import re
import typing

import pytest

from ctprune.recipe import load_recipe
from ctprune.recipe_keys import INHERITS, SECTIONS
from detector.config import ConfigError, parse_overrides

BASE_RECIPE = """\
name: ranges
synthetic: {out_dir: data/shapes, num_train: 4, num_val: 2, image_size: 64}
model: {arch: res18, num_classes: 2, input: {input_size: [64, 64]}}
data: {format: coco, train: a.json, val: b.json, images: imgs}
baseline: {}
train: {epochs: 4, lr_steps: [3]}
sparsity: {}
prune: {ratio: 0.2}
finetune: {epochs: 2, lr_steps: [1], distill: {teachers: [{weight: 1.0}]}}
quantize: {}
evaluate: {}
report: {}
"""

# (overrides, the dotted key the message starts with, a fragment of what it expects)
RANGE_CASES = [
    (["quantize.images=0"], "quantize.images", "an integer from 1 to 128, got 0"),
    (["quantize.images=129"], "quantize.images", "an integer from 1 to 128, got 129"),
    (["quantize.percentile=90"], "quantize.percentile", "> 90 and <= 100, got 90.0"),
    (["quantize.percentile=100.5"], "quantize.percentile", "> 90 and <= 100, got 100.5"),
    (["quantize.calibration=mse"], "quantize.calibration", "one of minmax, entropy"),
    (["quantize.reduce_range=maybe"], "quantize.reduce_range", "one of auto, on, off"),
    (["quantize.runtime=torch"], "quantize.runtime", "onnxruntime; torch (PT2E"),
    (["synthetic.num_train=0"], "synthetic.num_train", "an integer >= 1, got 0"),
    (["synthetic.num_val=-2"], "synthetic.num_val", "an integer >= 1, got -2"),
    (["synthetic.image_size=16"], "synthetic.image_size", "an integer >= 32, got 16"),
    (["synthetic.seed=-1"], "synthetic.seed", "an integer >= 0, got -1"),
    (["model.arch=res99"], "model.arch", "one of res18, res34"),
    (["model.num_classes=0"], "model.num_classes", "an integer >= 1, got 0"),
    (["model.head_conv=-1"], "model.head_conv", "an integer >= 0, got -1"),
    (["model.class_names=[a]"], "model.class_names", "num_classes = 2 names, got 1"),
    (["model.input.input_size=[0, 0]"], "model.input.input_size", "positive multiples"),
    (["model.input.input_size=[48, 48]"], "model.input.input_size",
     "multiples of input.pad + 1 = 32"),
    (["model.input.mean=[.nan, 0, 0]"], "model.input.mean", "finite values"),
    (["model.input.std=[1, 1, 0]"], "model.input.std", "positive finite values"),
    (["model.input.std=[1, 1, .inf]"], "model.input.std", "positive finite values"),
    (["model.input.pad=30"], "model.input.pad", "pad + 1 a power of two"),
    (["model.input.down_ratio=3"], "model.input.down_ratio", "a power of two"),
    (["model.input.down_ratio=8"], "model.input.down_ratio", "expected 4"),
    (["model.input.keep_resolution='yes'"], "model.input.keep_resolution", "bool, got 'yes'"),
    (["train.epochs=0"], "train.epochs", "an integer >= 1, got 0"),
    (["train.batch_size=0"], "train.batch_size", "an integer >= 1, got 0"),
    (["train.lr=-1"], "train.lr", "a finite number > 0, got -1.0"),
    (["train.lr=0"], "train.lr", "a finite number > 0, got 0.0"),
    (["train.lr=nan"], "train.lr", "a finite number > 0, got nan"),
    (["train.lr=.inf"], "train.lr", "a finite number > 0, got inf"),
    (["train.momentum=1"], "train.momentum", ">= 0 and < 1, got 1.0"),
    (["train.weight_decay=-0.1"], "train.weight_decay", ">= 0, got -0.1"),
    (["train.lr_steps=[0]"], "train.lr_steps", "> 0, got 0.0"),
    (["train.lr_steps=[3, 2]"], "train.lr_steps", "increasing epochs, got [3.0, 2.0]"),
    (["train.gamma=2"], "train.gamma", "> 0 and <= 1, got 2.0"),
    (["train.warmup_epochs=-1"], "train.warmup_epochs", ">= 0 and <= 4, got -1.0"),
    (["train.warmup_epochs=5"], "train.warmup_epochs", ">= 0 and <= 4, got 5.0"),
    (["train.warmup_factor=0"], "train.warmup_factor", "> 0 and <= 1, got 0.0"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio", ">= 0 and <= 1, got 1.5"),
    (["train.grad_clip=-1"], "train.grad_clip", "> 0, got -1.0"),
    (["train.grad_clip=0"], "train.grad_clip", "> 0, got 0.0"),
    (["train.accumulate=0"], "train.accumulate", "an integer >= 1, got 0"),
    (["train.accumulate=1.5"], "train.accumulate", "expected int, got 1.5"),
    (["train.skip_loss_factor=1"], "train.skip_loss_factor", "> 1, got 1.0"),
    (["train.skip_loss_factor=nan"], "train.skip_loss_factor", "> 1, got nan"),
    (["train.balance_magnitudes={cls: 1.5}"], "train.balance_magnitudes",
     "task-term names (heatmap, wh, offset, ltrb, pull, push), got 'cls'"),
    (["train.balance_magnitudes={heatmap: 0}"], "train.balance_magnitudes.heatmap",
     "> 0, got 0"),
    (["train.heatmap_loss=l2"], "train.heatmap_loss",
     "'focal' or 'mse' or 'focal_labelled', got 'l2'"),
    (["train.ema_decay=1"], "train.ema_decay", "> 0 and < 1, got 1.0"),
    (["train.ema_decay=0"], "train.ema_decay", "> 0 and < 1, got 0.0"),
    (["finetune.ema_decay=-0.5"], "finetune.ema_decay", "> 0 and < 1, got -0.5"),
    (["train.seed=-1"], "train.seed", "an integer >= 0, got -1"),
    (["train.workers=-1"], "train.workers", "an integer >= 0, got -1"),
    (["train.eval_interval=-1"], "train.eval_interval", "an integer >= 0, got -1"),
    (["train.max_objects=0"], "train.max_objects", "an integer >= 1, got 0"),
    (["train.min_overlap=1"], "train.min_overlap", "> 0 and < 1, got 1.0"),
    (["train.min_overlap=0"], "train.min_overlap", "> 0 and < 1, got 0.0"),
    (["train.log_interval=0"], "train.log_interval", "an integer >= 1, got 0"),
    (["train.deterministic=1"], "train.deterministic", "bool, got 1"),
    (["train.augment.flip=1.5"], "train.augment.flip", "a probability in [0, 1], got 1.5"),
    (["train.augment.flip=yes"], "train.augment.flip", "float, got True"),  # YAML 1.1: bool
    (["train.augment.shift=-0.1"], "train.augment.shift", ">= 0, got -0.1"),
    (["train.augment.scale=1"], "train.augment.scale", ">= 0 and < 1, got 1.0"),
    (["train.augment.color='on'"], "train.augment.color", "bool, got 'on'"),
    (["finetune.lr=-1"], "finetune.lr", "> 0, got -1.0"),
    (["finetune.grad_clip=-1"], "finetune.grad_clip", "> 0, got -1.0"),
    (["finetune.epochs=0"], "finetune.epochs", "an integer >= 1, got 0"),
    (["sparsity.strength=-1"], "sparsity.strength", "a number >= 0, got -1"),
    (["sparsity.strength=.inf"], "sparsity.strength", "a number >= 0, got inf"),
    (["prune.ratio=1"], "prune.ratio", "in [0, 1), got 1"),
    (["prune.ratio=[0.2, 0.2]"], "prune.ratio", "distinct sweep values, got [0.2, 0.2]"),
    (["prune.ratio=null", "prune.target_macs=0"], "prune.target_macs", "in (0, 1], got 0"),
    (["prune.ratio=null", "prune.target_params=0"], "prune.target_params", "in (0, 1], got 0"),
    (["prune.ratio=null", "prune.target_latency=1.5"], "prune.target_latency",
     "in (0, 1], got 1.5"),
    (["prune.threads=0"], "prune.threads", "a positive integer, got 0"),
    (["prune.calibration_batches=0"], "prune.calibration_batches", "an integer >= 1, got 0"),
    (["prune.runtime=tensorrt"], "prune.runtime", "one of ('torch', 'onnxruntime', 'cuda')"),
    (["prune.allocation=best"], "prune.allocation", "one of ('uniform', 'sensitivity')"),
    (["prune.allocation=sensitivity"], "prune.allocation", "it needs target_macs, target_params"),
    (["prune.target_latency=0.4"], "prune.ratio", "exactly one of prune.ratio, prune.target_macs"),
    (["prune.max_layer_ratio=1"], "prune.max_layer_ratio", "in (0, 1), got 1"),
    (["prune.round_to=0"], "prune.round_to", "None or a positive integer, got 0"),
    (["prune.rounds=0"], "prune.rounds", "an integer >= 1, got 0"),
    (["prune.recalibrate_batches=-1"], "prune.recalibrate_batches", "an integer >= 0, got -1"),
    (["prune.ratio_overrides={'neck.*': 0.9}"], "prune.ratio_overrides",
     "[0, max_layer_ratio = 0.8] for 'neck.*', got 0.9"),
    (["prune.ratio_overrides={'': 0.1}"], "prune.ratio_overrides", "patterns"),
    (["finetune.distill.temperature=0"], "finetune.distill.temperature", "> 0, got 0.0"),
    (["finetune.distill.heatmap_weight=-1"], "finetune.distill.heatmap_weight", ">= 0"),
    (["finetune.distill.wh_weight=-1"], "finetune.distill.wh_weight", ">= 0"),
    (["finetune.distill.offset_weight=nan"], "finetune.distill.offset_weight", ">= 0, got nan"),
    (["finetune.distill.feature_weight=-1"], "finetune.distill.feature_weight", ">= 0"),
    (["finetune.distill.teachers=[{weight: -1}]"], "finetune.distill.teachers[0].weight",
     ">= 0, got -1.0"),
    (["finetune.distill.teachers=[{classes: [-1]}]"], "finetune.distill.teachers[0].classes",
     "an integer >= 0, got -1"),
    (["data=''"], "data", "a mapping or the path of a data.yaml, got ''"),
    (["baseline.checkpoint=''"], "baseline.checkpoint", "a file path or null, got ''"),
    (["train.pretrained=' '"], "train.pretrained", "a file path or null, got ' '"),
    (["evaluate.batch_size=0"], "evaluate.batch_size", "an integer >= 1, got 0"),
    (["evaluate.max_detections=0"], "evaluate.max_detections", "an integer >= 1, got 0"),
    (["evaluate.scales=[]"], "evaluate.scales", "at least one test scale"),
    (["evaluate.scales=[0]"], "evaluate.scales", "> 0, got 0.0"),
    (["evaluate.scales=[1, 1]"], "evaluate.scales", "distinct scales"),
    (["evaluate.workers=-1"], "evaluate.workers", "an integer >= 0, got -1"),
    (["evaluate.flip='yes'"], "evaluate.flip", "bool, got 'yes'"),
    (["report.latency_repeats=0"], "report.latency_repeats", "an integer >= 1, got 0"),
    (["report.threads=0"], "report.threads", "an integer >= 1, got 0"),
]


@pytest.fixture
def base_recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE_RECIPE)
    return path


def test_the_base_recipe_is_valid(base_recipe):
    recipe = load_recipe(base_recipe, check_files=False)
    assert recipe.name == "ranges" and recipe.finetune.distill.teachers[0].weight == 1.0


@pytest.mark.parametrize("overrides, key, expected", RANGE_CASES,
                         ids=[" ".join(case[0]) for case in RANGE_CASES])
def test_an_out_of_range_value_is_named_with_its_range(base_recipe, overrides, key, expected):
    with pytest.raises(ConfigError) as caught:
        load_recipe(base_recipe, overrides, check_files=False)
    message = str(caught.value)
    assert message.startswith(f"{key}: expected"), message
    assert expected in message, message


def _is_numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_is_numeric(argument) for argument in typing.get_args(annotation))


def test_every_numeric_key_has_a_range_case():
    """A new numeric key needs its range check and a row in RANGE_CASES."""
    covered = {re.sub(r"\[\d+\]", "[]", key) for _, key, _ in RANGE_CASES}
    missing = []
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not _is_numeric(hints[field.name]):
                continue
            key = f"{section}.{field.name}".replace("[].", "[].")
            inherited = section in INHERITS and field.name in INHERITS[section][1]
            parent = f"{INHERITS[section][0]}.{field.name}" if inherited else None
            if key not in covered and parent not in covered:
                missing.append(key)
    assert not missing, f"numeric keys without a range case: {missing}"


@pytest.mark.parametrize("name", ["../../x", "", "/x", ".hidden", "a/b", "a\\b", "a..b", "."])
def test_a_recipe_name_must_be_a_folder_name(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE_RECIPE.replace("name: ranges", f"name: {json.dumps(name)}"))
    with pytest.raises(ConfigError) as caught:
        load_recipe(path, check_files=False)
    assert str(caught.value).startswith("name: expected letters, digits, '.', '_' or '-'")
    assert repr(name) in str(caught.value)


def test_recipe_names_that_are_folder_names_load(base_recipe):
    for name in ("shapes_res18", "res101_l1_0.2", "run-2"):
        assert load_recipe(base_recipe, [f"name={name}"], check_files=False).name == name


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00", "not a UTF-8 YAML text"),
        (b"name: x\x00\x01\x02", "not a YAML text (it holds NUL bytes"),
        (b"", "empty; expected a mapping of sections"),
        (b"# only a comment\n", "empty; expected a mapping of sections"),
        (b"- a\n- list\n", "expected a mapping of sections, got list"),
        (b"just a string\n", "expected a mapping of sections, got str"),
        (b"train: {lr: [1, \n", "not valid YAML"),
    ],
)
def test_an_unreadable_recipe_file_is_named(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path, check_files=False)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)


def test_the_cli_reports_a_binary_recipe_in_one_line(tmp_path, capsys):
    from ctprune.cli import main

    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04\xff\xd8\xff" * 10)
    assert main(["run", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}: not a UTF-8 YAML text" in error and "Traceback" not in error


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr", "--set 'train.lr': expected section.key=value"),
        ("=1", "--set '=1': expected section.key=value"),
        ("train=1", "train: expected a mapping of TrainConfig fields, got 1"),
        ("lr=1", "--set 'lr=1': expected section.key=value"),
        ("train..lr=1", "--set 'train..lr=1': expected section.key=value"),
        ("trian.lr=1", "--set 'trian.lr=1': section 'trian' is not read here"),
        ("train.lr=[1,", "--set 'train.lr=[1,': unreadable value"),
        ("train.lr=fast", "train.lr: expected float, got 'fast'"),
        ("train.lrr=1", "train: unknown keys ['lrr']"),
    ],
)
def test_malformed_overrides_are_named(base_recipe, override, expected):
    with pytest.raises(ConfigError) as caught:
        load_recipe(base_recipe, [override], check_files=False)
    assert expected in str(caught.value)


def test_overrides_can_be_limited_to_some_sections():
    assert parse_overrides(["evaluate.flip=true"], sections=("evaluate",)) == {
        "evaluate": {"flip": True}
    }
    with pytest.raises(ConfigError, match=r"section 'train' is not read here; expected a key of: "
                                          "evaluate"):
        parse_overrides(["train.lr=1"], sections=("evaluate",))


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"input": {"input_size": [0, 0]}}, "model_config.input.input_size: expected"),
        ({"input": {"std": [0.2, 0.0, 0.2]}}, "model_config.input.std: expected positive"),
        ({"num_classes": 3, "class_names": ["a", "b"]},
         "model_config.class_names: expected num_classes = 3 names, got 2"),
        ({"arch": "res99"}, "model_config.arch: expected one of res18"),
    ],
)
def test_a_checkpoint_with_an_impossible_model_config_is_named(tmp_path, change, expected):
    import torch
    from tiny import tiny_config

    from detector.checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint
    from detector.config import merge, to_dict

    path = tmp_path / "bad.pt"
    model_config = merge(to_dict(tiny_config()), change)
    torch.save({"format": FORMAT_VERSION, "model_config": model_config, "channel_plan": None,
                "state_dict": {}, "meta": {}}, path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert str(caught.value).startswith(f"{path}: invalid model_config: {expected}")
