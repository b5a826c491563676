"""The training loop: learning, checkpoints, best selection, resume (kill-and-resume:
test_faults.py)."""

from pathlib import Path

import pytest
import torch
from tiny import TinyDetectionData, tiny_config
from torch.utils.data import default_collate

from detector import load_model, read_checkpoint
from detector.checkpoint import build_from_config
from detector.engine.config import TrainConfig
from detector.engine.fit import TrainingDiverged, fit
from detector.engine.train import train_loader

TESTS = Path(__file__).parent


def _config(**overrides):
    settings = dict(epochs=2, batch_size=4, lr=2e-3, workers=0, eval_interval=1,
                    lr_steps=[100.0], log_interval=1, seed=1)
    return TrainConfig(**{**settings, **overrides})


def _run(out_dir, config, **kwargs):
    torch.manual_seed(0)
    model_config = tiny_config()
    model = build_from_config(model_config)
    loader = train_loader(TinyDetectionData(8), config, collate_fn=default_collate)
    result = fit(model, model_config, config, loader, out_dir, **kwargs)
    return model, result


def test_loss_falls_and_files_are_written(tmp_path):
    _, result = _run(tmp_path, _config(epochs=8))
    losses = [record["train_loss"] for record in result.history]
    assert losses[-1] < 0.75 * losses[0]
    assert {p.name for p in tmp_path.iterdir()} >= {"last.pt", "resume.pt", "metrics.jsonl"}
    assert read_checkpoint(tmp_path / "last.pt").meta["epoch"] == 8
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["epoch"] == 8


def test_best_checkpoint_follows_the_metric(tmp_path):
    scores = iter([0.1, 0.3, 0.2])
    _, result = _run(tmp_path, _config(epochs=3), evaluate=lambda model: {"ap50": next(scores)})
    assert (result.best_epoch, result.best_value) == (2, 0.3)
    assert read_checkpoint(tmp_path / "best.pt").meta["epoch"] == 2


def test_extension_points_are_called(tmp_path):
    calls = {"backward": 0, "step": 0, "epochs": []}
    extra = torch.nn.Parameter(torch.zeros(3))

    def loss_with_extra(outputs, batch):
        from detector.losses import centernet_loss

        total, parts = centernet_loss(outputs, batch)
        return total + (extra - 1).pow(2).sum(), parts

    _run(
        tmp_path,
        _config(epochs=2),
        loss_fn=loss_with_extra,
        extra_parameters=[extra],
        after_backward=lambda model: calls.__setitem__("backward", calls["backward"] + 1),
        after_step=lambda model: calls.__setitem__("step", calls["step"] + 1),
        on_epoch_end=lambda epoch, model, record: calls["epochs"].append(epoch),
    )
    assert calls == {"backward": 4, "step": 4, "epochs": [1, 2]}
    assert torch.all(extra > 0)  # the extra parameter was optimised


def test_forward_kwargs_reach_the_model_and_on_step_end_sees_every_step(tmp_path):
    from detector.losses import centernet_loss

    returned_features, steps = [], []

    def loss_reading_features(outputs, batch):
        returned_features.append("features" in outputs[-1])
        return centernet_loss(outputs, batch)

    _run(
        tmp_path,
        _config(epochs=2),
        loss_fn=loss_reading_features,
        forward_kwargs={"return_features": True},
        on_step_end=lambda step, model, parts: steps.append((step, sorted(parts))),
    )
    assert returned_features == [True] * 4
    assert [step for step, _ in steps] == [1, 2, 3, 4] and "heatmap" in steps[0][1]


def test_extra_parameters_survive_a_resume(tmp_path):
    def run(out_dir, epochs, resume=False):
        extra = torch.nn.Parameter(torch.zeros(3))

        def loss_with_extra(outputs, batch):
            from detector.losses import centernet_loss

            total, parts = centernet_loss(outputs, batch)
            return total + (extra - 1).pow(2).sum(), parts

        _run(out_dir, _config(epochs=epochs), loss_fn=loss_with_extra, extra_parameters=[extra],
             resume=resume)
        return extra.detach()

    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 3, resume=True)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"extra parameters have shapes \[\(3,\)\]"):
        _run(tmp_path / "split", _config(epochs=4), resume=True,
             extra_parameters=[torch.nn.Parameter(torch.zeros(5))])


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight, _ = _run(tmp_path / "straight", _config(epochs=3))
    _run(tmp_path / "split", _config(epochs=2))
    _run(tmp_path / "split", _config(epochs=3), resume=True)
    resumed, _ = load_model(tmp_path / "split" / "last.pt")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    _run(tmp_path, _config(epochs=1))
    before = (tmp_path / "last.pt").read_bytes()

    def exploding(outputs, batch):
        return torch.tensor(float("nan")), {}

    with pytest.raises(TrainingDiverged, match="at epoch 2, step 1.*epoch 1"):
        _run(tmp_path, _config(epochs=2), loss_fn=exploding, resume=True)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resume_needs_a_run_and_the_same_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        _run(tmp_path, _config(), resume=True)
    _run(tmp_path, _config(epochs=1))
    model_config = tiny_config("res34")
    model = build_from_config(model_config)
    loader = train_loader(TinyDetectionData(8), _config(), collate_fn=default_collate)
    with pytest.raises(ValueError, match="arch 'res18', expected 'res34'"):
        fit(model, model_config, _config(), loader, tmp_path, resume=True)
