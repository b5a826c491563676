"""Training extras: gradient accumulation (train.accumulate) and the weight average
(train.ema_decay), both resumable."""

import os
import re

import pytest
import torch
import yaml
from tiny import TinyDetectionData, tiny_config
from torch import nn
from torch.utils.data import default_collate

from detector import load_model
from detector.checkpoint import build_from_config
from detector.engine.config import TrainConfig
from detector.engine.ema import WeightAverage
from detector.engine.fit import _accumulation_group, fit
from detector.engine.optim import optimizer_steps_per_epoch
from detector.engine.train import train_loader
from detector.losses import centernet_loss


def _config(**overrides):
    settings = dict(epochs=2, batch_size=4, lr=2e-3, workers=0, eval_interval=1,
                    lr_steps=[100.0], log_interval=1, seed=1)
    return TrainConfig(**{**settings, **overrides})


def _batchnorm_frozen(model: nn.Module) -> nn.Module:
    """BatchNorm in training mode normalises each forward by its own batch, so 2 x 4 images are
    not one batch of 8 through it: the accumulation check keeps every BatchNorm in eval mode
    (running statistics, unchanged) while fit trains the rest."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            module.train = lambda mode=True, module=module: module  # fit's model.train() skips it
    return model


def _mean_over_images(outputs, batch):
    """The CenterNet loss per image, averaged: CenterNet's own loss divides by the batch's object
    count, so the mean of two halves' losses is not the whole batch's loss (their counts
    differ); averaged per image, a batch of 8 is exactly the mean of its two halves."""
    totals = []
    for index in range(len(batch["image"])):
        def image(values, index=index):
            return {key: value[index:index + 1] for key, value in values.items()
                    if torch.is_tensor(value)}

        totals.append(centernet_loss([image(stack) for stack in outputs], image(batch))[0])
    total = torch.stack(totals).mean()
    return total, {"total": total.detach()}


def _run(out_dir, config, images=8, prepare=lambda model: model, **kwargs):
    torch.manual_seed(0)
    model_config = tiny_config()
    model = prepare(build_from_config(model_config))
    loader = train_loader(TinyDetectionData(images), config, collate_fn=default_collate)
    result = fit(model, model_config, config, loader, out_dir, **kwargs)
    return model, result


def test_accumulating_two_batches_of_four_equals_one_batch_of_eight(tmp_path):
    settings = dict(optimizer="sgd", eval_interval=0)
    same = dict(prepare=_batchnorm_frozen, loss_fn=_mean_over_images)
    eight, _ = _run(tmp_path / "eight", _config(batch_size=8, **settings), **same)
    two_by_four, _ = _run(tmp_path / "four", _config(batch_size=4, accumulate=2, **settings),
                          **same)
    single, _ = _run(tmp_path / "single", _config(batch_size=4, **settings), **same)
    moved = 0.0
    for (name, value), other in zip(eight.state_dict().items(),
                                    two_by_four.state_dict().values(), strict=True):
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (single.state_dict()[name] - value).abs().max().item())
    assert moved > 1e-4  # without accumulation (two steps of 4) the weights differ


def test_accumulation_counts_optimiser_steps_and_the_effective_batch():
    config = _config(batch_size=4, accumulate=3, lr=1e-4)
    assert config.scaled_lr() == pytest.approx(1e-4 * 12 / 32)
    # 5 batches, accumulate 2: groups (0, 1), (2, 3) and the epoch's partial (4,).
    groups = [_accumulation_group(step, 5, 2) for step in range(5)]
    assert groups == [(2, False), (2, True), (2, False), (2, True), (1, True)]
    assert optimizer_steps_per_epoch(5, 2) == 3 and optimizer_steps_per_epoch(4, 1) == 4


def test_partial_group_steps_and_the_schedule_counts_optimiser_steps(tmp_path):
    steps = []
    _run(tmp_path / "run", _config(epochs=1, accumulate=2, eval_interval=0), images=12,
         after_step=lambda model: steps.append(1))
    resume = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert len(steps) == 2 and resume["scheduler"]["last_epoch"] == 2  # 3 batches: 2 + 1


def test_weight_average_follows_the_formula():
    model = nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    decay = min(0.9, 2 / 11)  # the warm-up's (1 + n) / (10 + n) after n = 1 update
    torch.testing.assert_close(average.model.weight, decay * start + (1 - decay) * model.weight)
    assert not average.model.weight.requires_grad


def test_ema_is_evaluated_and_saved_beside_the_raw_weights(tmp_path):
    seen = []

    def evaluate(model):
        seen.append(model)
        return {"ap50": float(len(seen))}  # improves every epoch: best.pt is the last epoch's

    trained, _ = _run(tmp_path / "run", _config(ema_decay=0.5), evaluate=evaluate)
    assert all(model is not trained for model in seen) and len(seen) == 2
    raw, _ = load_model(tmp_path / "run" / "last.pt")
    averaged, _ = load_model(tmp_path / "run" / "last_ema.pt")
    best, _ = load_model(tmp_path / "run" / "best.pt")
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(raw.state_dict()[name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(best.state_dict()[name], averaged.state_dict()[name],
                                   rtol=0, atol=0, msg=name)
        torch.testing.assert_close(seen[-1].state_dict()[name], averaged.state_dict()[name],
                                   rtol=0, atol=0, msg=name)
    weight = "heads.heatmap.2.weight"
    assert not torch.equal(raw.state_dict()[weight], averaged.state_dict()[weight])


def test_resume_with_ema_and_accumulation_matches_an_uninterrupted_run(tmp_path):
    config = dict(ema_decay=0.9, accumulate=2, eval_interval=0)
    _run(tmp_path / "straight", _config(epochs=3, **config), images=12)
    _run(tmp_path / "split", _config(epochs=2, **config), images=12)
    _run(tmp_path / "split", _config(epochs=3, **config), images=12, resume=True)
    for file in ("last.pt", "last_ema.pt"):
        straight, _ = load_model(tmp_path / "straight" / file)
        resumed, _ = load_model(tmp_path / "split" / file)
        for name, value in straight.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6,
                                       msg=f"{file}: {name}")


def test_resume_with_another_accumulation_is_refused(tmp_path):
    _run(tmp_path / "run", _config(epochs=1, accumulate=2, eval_interval=0))
    with pytest.raises(ValueError, match=r"resume\.pt: trained with train\.accumulate=2, this "
                                         r"run has 1; .* resume with train\.accumulate=2"):
        _run(tmp_path / "run", _config(epochs=2, eval_interval=0), resume=True)


def test_resume_without_a_saved_average_starts_it_from_the_resumed_weights(tmp_path):
    _run(tmp_path / "run", _config(epochs=1, eval_interval=0))
    with pytest.warns(UserWarning, match=r"resume\.pt holds no weight average \(train\.ema_"):
        _run(tmp_path / "run", _config(epochs=2, eval_interval=0, ema_decay=0.9), resume=True)
    assert (tmp_path / "run" / "last_ema.pt").is_file()


@pytest.mark.skipif(
    not os.environ.get("CTPRUNE_SLOW_TESTS"),
    reason="two torchrun jobs (about 30 s on 2 cores); set CTPRUNE_SLOW_TESTS=1",
)
def test_two_processes_accumulate_and_average_as_one_model(tmp_path, tmp_path_factory):
    """Under torchrun the ranks skip the gradient all-reduce inside a group (no_sync) and
    average on its last backward: both ranks end with one model, and a kill-and-resume of the
    distributed run with EMA and accumulation finishes its epochs."""
    from test_distributed import _torchrun
    from test_distributed import recipe as recipe_fixture

    raw = yaml.safe_load(recipe_fixture.__wrapped__(tmp_path_factory).read_text())
    raw["train"].update(accumulate=2, ema_decay=0.9)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    finished = _torchrun(path, tmp_path / "ddp")
    assert finished.returncode == 0, finished.stderr[-3000:]
    checksums = re.findall(r"FINAL epochs=\d+ checksum=(-?\d+\.\d{6})", finished.stdout)
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    killed = _torchrun(path, tmp_path / "run", kill_rank=1, kill_epoch=1)
    assert killed.returncode != 0
    resumed = _torchrun(path, tmp_path / "run", mode="resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for file in ("last.pt", "last_ema.pt"):
        straight, _ = load_model(tmp_path / "ddp" / file)
        again, _ = load_model(tmp_path / "run" / file)
        for name, value in straight.state_dict().items():
            torch.testing.assert_close(again.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{file}: {name}")
