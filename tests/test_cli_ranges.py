"""Every numeric command-line option is range-checked by argparse, naming the option, before any
work starts; `ctprune eval` refuses overrides of sections it does not read."""

from types import SimpleNamespace

import pytest

from ctprune.cli import main

# (arguments, the option named, what it expects)
OPTION_CASES = [
    (["make-data", "shapes", "OUT", "--train", "0"], "--train", "an integer >= 1, got 0"),
    (["make-data", "shapes", "OUT", "--val", "-1"], "--val", "an integer >= 1, got -1"),
    (["make-data", "shapes", "OUT", "--size", "8"], "--size", "an integer >= 32, got 8"),
    (["make-data", "shapes", "OUT", "--seed", "-1"], "--seed", "an integer >= 0, got -1"),
    (["make-data", "shapes", "OUT", "--train", "many"], "--train", "an integer, got 'many'"),
    (["make-data", "split", "A.json", "OUT", "--val-fraction", "1"], "--val-fraction",
     "a number in (0, 1), got 1"),
    (["make-data", "split", "A.json", "OUT", "--val-fraction", "nan"], "--val-fraction",
     "a finite number, got 'nan'"),
    (["show-data", "D.yaml", "--out", "O", "--count", "-3"], "--count", "an integer >= 1, got -3"),
    (["show-data", "D.yaml", "--out", "O", "--count", "0"], "--count", "an integer >= 1, got 0"),
    (["bench", "A.pt", "--rounds", "0"], "--rounds", "an integer >= 1, got 0"),
    (["bench", "A.pt", "--threads", "0"], "--threads", "an integer >= 1, got 0"),
    (["bench", "A.pt", "--input", "30"], "--input", "a positive multiple of 32"),
    (["bench", "A.pt", "--input", "0"], "--input", "a positive multiple of 32"),
    (["report", "RUN", "--threads", "0"], "--threads", "an integer >= 1, got 0"),
    (["detect", "A.pt", "I.png", "--out", "O", "--threshold", "2"], "--threshold",
     "a number in [0, 1], got 2"),
    (["detect", "A.pt", "I.png", "--out", "O", "--threshold", "-0.1"], "--threshold",
     "a number in [0, 1], got -0.1"),
    (["detect", "A.pt", "I.png", "--out", "O", "--batch-size", "0"], "--batch-size",
     "an integer >= 1, got 0"),
    (["info", "A.pt", "--input-size", "0", "0"], "--input-size", "a positive multiple of 32"),
    (["export", "A.pt", "--format", "onnx", "--max-detections", "0"], "--max-detections",
     "an integer >= 1, got 0"),
    (["export", "A.pt", "--format", "onnx", "--input-size", "64", "100"], "--input-size",
     "a positive multiple of 32 (the networks' stride), got 100"),
    (["prune", "A.pt", "--out", "B.pt", "--ratio", "1.5"], "--ratio",
     "a number in [0, 1), got 1.5"),
    (["prune", "A.pt", "--out", "B.pt", "--target-macs", "0"], "--target-macs",
     "a number in (0, 1], got 0"),
    (["prune", "A.pt", "--out", "B.pt", "--max-layer-ratio", "1"], "--max-layer-ratio",
     "a number in (0, 1), got 1"),
    (["prune", "A.pt", "--out", "B.pt", "--round-to", "-16"], "--round-to",
     "an integer >= 0, got -16"),
    (["prune", "A.pt", "--out", "B.pt", "--input-size", "-64", "64"], "--input-size",
     "a positive multiple of 32 (the networks' stride), got -64"),
    (["import-original", "A.pth", "--arch", "res18", "--out", "B.pt", "--input-size", "0", "512"],
     "--input-size", "a positive multiple of 32 (the networks' stride), got 0"),
]


@pytest.mark.parametrize("arguments, option, expected", OPTION_CASES,
                         ids=[" ".join(case[0][:1] + case[0][-2:]) for case in OPTION_CASES])
def test_a_numeric_option_out_of_range_is_refused_naming_it(capsys, arguments, option, expected):
    with pytest.raises(SystemExit) as caught:
        main(arguments)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}: expected {expected}" in error, error
    assert "Traceback" not in error


def test_eval_refuses_overrides_of_sections_it_does_not_read(tmp_path, capsys):
    arguments = ["eval", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.yaml")]
    assert main([*arguments, "--set", "train.lr=1"]) == 2
    error = capsys.readouterr().err
    assert "--set 'train.lr=1': section 'train' is not read here" in error
    assert "evaluate" in error
    assert main([*arguments, "--set", "evaluate.batch_size=0"]) == 2
    assert "evaluate.batch_size: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_eval_applies_evaluate_overrides(tmp_path, monkeypatch):
    import detector
    import detector.data.sources as sources
    import detector.evaluate.run as evaluate_run

    seen = {}
    checkpoint = SimpleNamespace(model_config=SimpleNamespace(class_names=["a"]))
    monkeypatch.setattr(detector, "load_model", lambda path: (object(), checkpoint))
    monkeypatch.setattr(sources, "load_data_yaml", lambda path: path)
    monkeypatch.setattr(sources, "load_source",
                        lambda config, split: SimpleNamespace(class_names=["a"]))

    def fake_evaluate(model, source, model_config, config, device, out_dir):
        seen["config"] = config
        return {"ap": 0.5}

    monkeypatch.setattr(evaluate_run, "evaluate_model", fake_evaluate)
    arguments = ["eval", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.yaml"),
                 "--device", "cpu", "--out", str(tmp_path / "eval"),
                 "--set", "evaluate.flip=true", "--set", "evaluate.scales=[0.5, 1]"]
    assert main(arguments) == 0
    assert seen["config"].flip is True and seen["config"].scales == [0.5, 1.0]
