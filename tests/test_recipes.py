"""Recipes and the runner: every shipped recipe validates, the smoke recipe runs the whole chain,
a second run skips finished stages, bad input is named (runs killed and resumed: test_faults.py)."""

import json
import shutil
from pathlib import Path

import pytest

from ctprune.recipe import branches, load_recipe
from ctprune.run import RunError, run_recipe, write_manifest
from detector.config import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path, check_files=False)
    assert recipe.name == path.stem
    # A training recipe (`ctprune train`) is a run recipe without `prune`.
    assert branches(recipe) or recipe.prune is None


def _smoke_copy(tmp_path) -> Path:
    """The smoke recipe in a folder of its own, so its relative data path lands in tmp_path."""
    (tmp_path / "recipes").mkdir()
    return Path(shutil.copy(SMOKE, tmp_path / "recipes" / "smoke.yaml"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    recipe = load_recipe(_smoke_copy(tmp_path))
    log = []
    report = run_recipe(recipe, tmp_path / "run", log=log.append)
    return tmp_path, recipe, report, log


def test_smoke_recipe_runs_the_whole_chain(smoke_run):
    tmp_path, recipe, report, log = smoke_run
    run = tmp_path / "run"
    names = [row["name"] for row in report["rows"]]
    assert names[0] == "baseline"
    assert {"l1_r0.5/prune", "l1_r0.5/finetune", "control_random_r0.5/finetune",
            "control_unpruned/finetune"} <= set(names)
    for row in report["rows"]:
        assert row["params"] > 0 and row["gmacs"] > 0 and row["latency_ms"] > 0
        assert 0.0 <= row["ap50"] <= 1.0
    pruned = next(row for row in report["rows"] if row["name"] == "l1_r0.5/finetune")
    baseline = report["rows"][0]
    assert pruned["gmacs"] < baseline["gmacs"] and pruned["params"] < baseline["params"]
    for name in ("report.json", "report.md", "report.html", "manifest.json", "recipe.yaml"):
        assert (run / name).is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe_name"] == "smoke" and manifest["versions"]["torch"]
    stage = json.loads((run / "l1_r0.5" / "prune" / "stage.json").read_text())
    assert stage["complete"] and stage["prune"]["criterion"] == "l1"
    # Figures are measured once as each stage finishes; the report reads them back.
    assert stage["figures"]["precision"] == "fp32" and stage["figures"]["threads"] == 1
    assert report["runs"][0]["measured"] is False
    by_name = {row["name"]: row for row in report["rows"]}
    assert by_name["l1_r0.5/prune"]["latency_ms"] == stage["figures"]["latency_ms"]
    speedups = {entry["name"] for entry in report["speedups"]}
    assert "l1_r0.5/finetune" in speedups and "control_unpruned/finetune" not in speedups


def test_a_second_run_skips_finished_stages(smoke_run):
    tmp_path, recipe, _, _ = smoke_run
    log = []
    run_recipe(recipe, tmp_path / "run", log=log.append)
    stage_lines = [line for line in log if line.startswith("[")]
    assert stage_lines and all(line.startswith("[skip]") for line in stage_lines)


def test_a_changed_finetune_reruns_only_the_finetunes(smoke_run):
    tmp_path, _, _, _ = smoke_run
    recipe = load_recipe(tmp_path / "recipes" / "smoke.yaml", ["finetune.lr=5e-4"])
    shutil.copytree(tmp_path / "run", tmp_path / "changed")
    log = []
    run_recipe(recipe, tmp_path / "changed", log=log.append)
    ran = sorted(line.split()[1] for line in log if line.startswith("[run]"))
    assert ran == ["control_random_r0.5/finetune", "control_unpruned/finetune", "l1_r0.5/finetune"]


def test_the_manifest_names_the_recipe_and_command_without_machine_paths(
    smoke_run, tmp_path, monkeypatch
):
    _, recipe, _, _ = smoke_run
    monkeypatch.chdir(Path(recipe.source).parent.parent)  # the folder that holds recipes/
    program = str(tmp_path / "venv" / "bin" / "ctprune")
    write_manifest(recipe, tmp_path / "fresh", [program, "run", "recipes/smoke.yaml"])
    manifest = json.loads((tmp_path / "fresh" / "manifest.json").read_text())
    assert manifest["recipe_file"] == "recipes/smoke.yaml"
    assert manifest["command"] == ["ctprune", "run", "recipes/smoke.yaml"]


def test_a_folder_of_another_recipe_is_refused(smoke_run, tmp_path):
    _, recipe, _, _ = smoke_run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"recipe_name": "something_else"}))
    with pytest.raises(RunError, match="holds a run of recipe 'something_else'"):
        run_recipe(recipe, tmp_path / "run")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty and holds no ctprune run"):
        run_recipe(recipe, tmp_path / "stray")


def test_a_baseline_checkpoint_of_another_arch_is_refused(smoke_run, tmp_path):
    smoke_dir, _, _, _ = smoke_run
    baseline = smoke_dir / "run" / "baseline" / "checkpoint.pt"
    recipe = load_recipe(
        _smoke_copy(tmp_path),
        [f"baseline.checkpoint={baseline}", "model.arch=resunet18"],
    )
    # Found by the preflight, before the run folder is made.
    with pytest.raises(
        ConfigError, match=r"holds a res18 model, but the recipe's model.arch is resunet18"
    ):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_recipes_are_named_before_any_work(tmp_path):
    path = _smoke_copy(tmp_path)
    with pytest.raises(ConfigError, match=r"prune: unknown keys \['ration'\]"):
        load_recipe(path, ["prune.ration=0.3"])
    with pytest.raises(ConfigError, match="prune.criterion: unknown criterion 'l3'"):
        load_recipe(path, ["prune.criterion=l3"])
    with pytest.raises(FileNotFoundError, match="baseline.checkpoint: .*missing.pt does not exist"):
        load_recipe(path, ["baseline.checkpoint=missing.pt"])
    with pytest.raises(FileNotFoundError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_the_recipe_key_reference_is_up_to_date():
    from ctprune.recipe_keys import keys_markdown

    committed = (Path(__file__).resolve().parents[1] / "docs" / "recipe_keys.md").read_text()
    assert committed == keys_markdown(), (
        "regenerate: python -m ctprune.recipe_keys > docs/recipe_keys.md"
    )


def test_a_sweep_with_iterative_rounds(tmp_path):
    recipe = load_recipe(_smoke_copy(tmp_path), ["prune.rounds=2", "prune.ratio=[0.3, 0.5]",
                                                 "report.controls=false", "report.latency=false"])
    report = run_recipe(recipe, tmp_path / "run", log=lambda line: None)
    rows = {row["name"]: row for row in report["rows"]}
    for ratio in ("0.3", "0.5"):
        first, second = rows[f"l1_r{ratio}/prune_1"], rows[f"l1_r{ratio}/prune_2"]
        assert f"l1_r{ratio}/finetune_1" in rows and f"l1_r{ratio}/finetune_2" in rows
        # Each round removes its ratio of what the previous round left.
        assert second["params"] < first["params"] < rows["baseline"]["params"]
    assert rows["l1_r0.5/prune_1"]["params"] < rows["l1_r0.3/prune_1"]["params"]


def _write_recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("name: demo\ndata: {train: a.json, val: b.json, images: images}\n" + text)
    return path


def test_finetune_takes_every_key_it_does_not_set_from_train(tmp_path):
    path = _write_recipe(tmp_path, (
        "train: {epochs: 7, batch_size: 4, lr: 1.0e-3, lr_steps: [5], workers: 0}\n"
        "prune: {ratio: 0.5}\n"
        "finetune: {epochs: 3, lr_steps: []}\n"
    ))
    recipe = load_recipe(path, ["train.seed=5"], check_files=False)
    finetune = recipe.finetune
    assert (finetune.epochs, finetune.lr_steps) == (3, [])
    assert (finetune.batch_size, finetune.lr, finetune.workers, finetune.seed) == (4, 1e-3, 0, 5)
    assert finetune.train_config().batch_size == 4
    # No finetune section at all: the fine-tune is the baseline's training.
    path = _write_recipe(tmp_path, "train: {epochs: 7, lr_steps: [5]}\nprune: {ratio: 0.5}\n")
    assert load_recipe(path, check_files=False).finetune.epochs == 7


def test_missing_finetune_epochs_and_late_lr_steps_are_named(tmp_path):
    path = _write_recipe(tmp_path, "prune: {ratio: 0.5}\nfinetune: {lr: 1.0e-3}\n")
    with pytest.raises(
        ConfigError, match="finetune.epochs: required when the recipe has no train section"
    ):
        load_recipe(path, check_files=False)
    path = _write_recipe(tmp_path, "prune: {ratio: 0.5}\nfinetune: {epochs: 10, lr_steps: []}\n")
    assert load_recipe(path, check_files=False).finetune.epochs == 10
    path = _write_recipe(tmp_path, "train: {epochs: 140, lr_steps: [90, 150]}\n")
    with pytest.raises(ConfigError, match="train.lr_steps: step 150 is beyond train.epochs 140"):
        load_recipe(path, check_files=False)
    # Inherited from train: the original's drops at 90 and 120 in a 10-epoch fine-tune.
    path = _write_recipe(tmp_path, "train: {epochs: 140}\nprune: {ratio: 0.5}\n"
                                   "finetune: {epochs: 10}\n")
    with pytest.raises(
        ConfigError, match="finetune.lr_steps: step 90 is beyond finetune.epochs 10"
    ):
        load_recipe(path, check_files=False)


def test_loading_has_no_side_effects_and_the_runner_generates_the_data(tmp_path):
    from ctprune.recipe import prepare_data
    from detector.data.sources import DataConfig

    path = _smoke_copy(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    recipe = load_recipe(path, ["synthetic.num_train=8", "synthetic.num_val=4"])
    assert sorted(tmp_path.rglob("*")) == before  # nothing generated, nothing written
    assert recipe.data == "../data/smoke_shapes/data.yaml"
    prepared = prepare_data(recipe)
    assert isinstance(prepared.data, DataConfig)
    assert (tmp_path / "data" / "smoke_shapes" / "data.yaml").is_file()


def test_ctprune_train_trains_a_run_recipes_baseline(tmp_path, capsys):
    from ctprune.cli import main

    path = _smoke_copy(tmp_path)
    settings = ["--set", "synthetic.num_train=16", "--set", "synthetic.num_val=8",
                "--set", "train.epochs=1", "--set", "train.eval_interval=0"]
    assert main(["train", str(path), "--out", str(tmp_path / "baseline"), *settings]) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    assert (tmp_path / "baseline" / "last.pt").is_file()


def test_prune_options_are_checked_at_every_sweep_point(tmp_path):
    path = _write_recipe(tmp_path, "train: {epochs: 2, lr_steps: []}\n"
                                   "prune: {ratio: [0.5, 0.9], criterion: [l1, l2]}\n")
    with pytest.raises(ConfigError, match="prune.ratio: 0.9 exceeds max_layer_ratio 0.8"):
        load_recipe(path, check_files=False)
    recipe = load_recipe(path, ["prune.max_layer_ratio=0.95"], check_files=False)
    options = recipe.prune.options("l2", 0.9, None)
    assert (options.criterion, options.ratio, options.max_layer_ratio) == ("l2", 0.9, 0.95)
    assert len(branches(recipe)) == 4


def test_the_triplet_chain_and_its_ctdet_twin_differ_only_in_the_head():
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    triplet = load_recipe(recipes / "shapes_triplets_chain.yaml", check_files=False)
    ctdet = load_recipe(recipes / "shapes_triplets_chain_ctdet.yaml", check_files=False)
    assert (triplet.model.head, ctdet.model.head) == ("triplet", "centernet")
    assert triplet.model.arch == ctdet.model.arch == "resunet18"
    for section in ("train", "prune", "finetune", "evaluate", "report"):
        assert getattr(triplet, section) == getattr(ctdet, section), section
    assert (triplet.prune.criterion, triplet.prune.target_macs, triplet.prune.scope) == (
        "l1", 0.5, "global"
    )
    assert triplet.finetune.epochs == 2
    assert [branch.name for branch in branches(triplet)] == [
        branch.name for branch in branches(ctdet)
    ]
