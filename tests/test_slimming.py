"""Network slimming: the L1 subgradient and the proximal step against hand computations, the
exclude patterns, the lr replay of fit's schedule, and a short fit run that sparsifies."""

import math

import pytest
import torch
from tiny import TinyDetectionData, tiny_config, tiny_model
from torch.utils.data import default_collate

from ctprune.pruning.slimming import (
    DEFAULT_L1_STRENGTH,
    DEFAULT_PROXIMAL_STRENGTH,
    SparsityConfig,
    affine_batchnorms,
    bn_gamma_statistics,
    lr_sum,
    scheduled_lr,
    sparsity_callbacks,
)
from detector.checkpoint import build_from_config
from detector.config import ConfigError, from_dict
from detector.engine.config import TrainConfig
from detector.engine.fit import fit
from detector.engine.optim import build_optimizer, build_scheduler
from detector.engine.train import train_loader
from detector.losses import centernet_loss


def _randomise_gammas(model, generator_seed=0):
    """Gammas of both signs and a few exact zeros, so sign() is exercised everywhere."""
    generator = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for _, norm in affine_batchnorms(model):
            values = torch.randn(norm.num_features, generator=generator)
            values[::5] = 0.0
            norm.weight.copy_(values)


def _backward(model):
    data = TinyDetectionData(4)
    batch = default_collate([data[i] for i in range(4)])
    loss, _ = centernet_loss(model(batch["image"]), batch)
    model.zero_grad(set_to_none=True)
    loss.backward()


def test_config_defaults_validation_and_recipe_loading():
    assert SparsityConfig().method == "proximal"
    assert SparsityConfig().strength == DEFAULT_PROXIMAL_STRENGTH
    assert SparsityConfig(method="l1").strength == DEFAULT_L1_STRENGTH
    loaded = from_dict(SparsityConfig, {"method": "l1", "strength": "1e-5"}, "sparsity")
    assert loaded.strength == 1e-5
    with pytest.raises(ConfigError, match="sparsity.method: expected 'l1' or 'proximal', got 'l2'"):
        from_dict(SparsityConfig, {"method": "l2"}, "sparsity")
    with pytest.raises(ValueError, match="strength: expected a number >= 0, got -0.1"):
        SparsityConfig(strength=-0.1)
    with pytest.raises(ValueError, match="strength: expected a number >= 0, got nan"):
        SparsityConfig(strength=math.nan)
    with pytest.raises(ValueError, match="exclude: expected a list"):
        SparsityConfig(exclude="neck.*")


def test_every_affine_batchnorm_of_trunk_and_neck_is_regularised():
    names = [name for name, _ in affine_batchnorms(tiny_model())]
    # res18: stem + 2 per block x 8 blocks + 3 downsamples; the neck: 3; the heads: none.
    assert len(names) == 1 + 16 + 3 + 3
    assert sum(name.startswith("neck.") for name in names) == 3
    assert not any(name.startswith("heads.") for name in names)


def test_l1_adds_exactly_strength_times_sign_of_gamma():
    model = tiny_model()
    _randomise_gammas(model)
    _backward(model)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    strength = 1e-3
    config = SparsityConfig("l1", strength)
    after_backward, after_step = sparsity_callbacks(model, config, optimizer_lr=0.1)
    assert after_step is None
    after_backward(model)
    gamma_names = {f"{name}.weight" for name, _ in affine_batchnorms(model)}
    for name, parameter in model.named_parameters():
        if name in gamma_names:
            signs = torch.where(parameter > 0, 1.0, torch.where(parameter < 0, -1.0, 0.0))
            expected = before[name] + strength * signs
            torch.testing.assert_close(parameter.grad, expected, rtol=0, atol=0, msg=name)
        else:  # convs, BN biases and heads are untouched
            assert torch.equal(parameter.grad, before[name]), name


def test_proximal_soft_thresholds_exactly_with_the_current_lr():
    model = tiny_model()
    stem = model.backbone.bn1  # 8 channels in the tiny model
    values = torch.tensor([-0.5, -1e-3, -4e-4, 0.0, 3e-4, 1e-3, 0.2, 2.0])
    with torch.no_grad():
        stem.weight.copy_(values)
    learning_rates = iter([0.1, 0.05])
    config = SparsityConfig("proximal", 1e-2)
    _, after_step = sparsity_callbacks(model, config, lambda: next(learning_rates))
    after_step(model)  # threshold 0.1 x 1e-2 = 1e-3
    expected = torch.tensor([-0.499, 0.0, 0.0, 0.0, 0.0, 0.0, 0.199, 1.999])
    torch.testing.assert_close(stem.weight.detach(), expected, rtol=0, atol=1e-7)
    assert torch.count_nonzero(stem.weight[1:6]) == 0  # exactly zero, not merely small
    after_step(model)  # threshold 0.05 x 1e-2 = 5e-4
    expected = expected - torch.sign(expected) * 5e-4
    torch.testing.assert_close(stem.weight.detach(), expected, rtol=0, atol=1e-7)


def test_exclude_patterns_leave_those_batchnorms_dense():
    model = tiny_model()
    _randomise_gammas(model)
    _backward(model)
    config = SparsityConfig("l1", 1e-2, exclude=["neck.*", "backbone.layer4.*"])
    gradients = {name: norm.weight.grad.clone() for name, norm in affine_batchnorms(model)}
    sparsity_callbacks(model, config, 0.1)[0](model)
    proximal = SparsityConfig("proximal", 1.0, exclude=config.exclude)
    _, after_step = sparsity_callbacks(model, proximal, 0.1)
    gammas = {name: norm.weight.detach().clone() for name, norm in affine_batchnorms(model)}
    after_step(model)
    for name, norm in affine_batchnorms(model):
        excluded = name.startswith(("neck.", "backbone.layer4."))
        assert torch.equal(norm.weight.grad, gradients[name]) == excluded, name
        assert torch.equal(norm.weight.detach(), gammas[name]) == excluded, name


def test_exclude_pattern_that_matches_nothing_is_an_error():
    message = "pattern 'nek.*' matches no affine BatchNorm; their names are like backbone.bn1"
    with pytest.raises(ValueError, match=message):
        sparsity_callbacks(tiny_model(), SparsityConfig(exclude=["nek.*"]), 0.1)
    with pytest.raises(ValueError, match="leave no BatchNorm"):
        sparsity_callbacks(tiny_model(), SparsityConfig(exclude=["*"]), 0.1)
    with pytest.raises(ValueError, match="no affine BatchNorm layer"):
        sparsity_callbacks(torch.nn.Conv2d(3, 3, 1), SparsityConfig(), 0.1)


@pytest.mark.parametrize("start_epoch", [0, 2])
def test_scheduled_lr_replays_the_schedule_fit_builds(start_epoch):
    config = TrainConfig(epochs=4, batch_size=8, lr=1e-3, schedule="cosine", warmup_epochs=0.5,
                         workers=0)
    steps_per_epoch = 5
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    used = []
    for _ in range(config.epochs * steps_per_epoch):
        used.append(optimizer.param_groups[0]["lr"])  # the lr optimizer.step() applies
        optimizer.step()
        scheduler.step()
    getter = scheduled_lr(config, steps_per_epoch, start_epoch)
    replayed = [getter() for _ in range(len(used) - start_epoch * steps_per_epoch)]
    assert replayed == pytest.approx(used[start_epoch * steps_per_epoch:], rel=1e-12)


def test_lr_sum_of_a_constant_schedule():
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-3, lr_steps=[100.0], workers=0)
    assert lr_sum(config, steps_per_epoch=10) == pytest.approx(30 * 1e-3 * 64 / 32)


def test_statistics_against_hand_counts():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(6, affine=False), torch.nn.BatchNorm2d(6)
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.0, -0.005, 0.5, -2.0]))
        model[2].weight.copy_(torch.tensor([0.009, 0.01, 1.0, 1.0, -1.0, 0.0]))
    statistics = bn_gamma_statistics(model, threshold=1e-2)
    # The BatchNorm without affine parameters is skipped.
    assert statistics["layers"] == 2 and statistics["channels"] == 10
    assert statistics["below_threshold"] == 4 and statistics["share_below_threshold"] == 0.4
    assert statistics["exactly_zero"] == 2
    assert statistics["per_layer_share_below"] == {"0": 0.5, "2": pytest.approx(2 / 6)}
    magnitudes = sorted([0.0, 0.005, 0.5, 2.0, 0.009, 0.01, 1.0, 1.0, 1.0, 0.0])
    assert statistics["quantiles"]["min"] == 0.0 and statistics["quantiles"]["max"] == 2.0
    # 10 values: the median interpolates halfway between the 5th and 6th smallest.
    assert statistics["quantiles"]["p50"] == pytest.approx((magnitudes[4] + magnitudes[5]) / 2)


def _fit_with(tmp_path, config, sparsity):
    torch.manual_seed(0)
    model_config = tiny_config()
    model = build_from_config(model_config)
    loader = train_loader(TinyDetectionData(16), config, collate_fn=default_collate)
    callbacks = (None, None)
    if sparsity is not None:
        callbacks = sparsity_callbacks(model, sparsity, scheduled_lr(config, len(loader)))
    fit(model, model_config, config, loader, tmp_path,
        after_backward=callbacks[0], after_step=callbacks[1])
    return bn_gamma_statistics(model)["share_below_threshold"]


@pytest.mark.parametrize(
    ("train_settings", "sparsity"),
    [
        # 12 steps at lr 0.05 x 4 / 32: a shrinkage budget of 12 x 0.00625 x 20 = 1.5 > gamma = 1.
        (dict(optimizer="adam", lr=0.05, lr_steps=[100.0]), SparsityConfig("proximal", 20.0)),
        # A subgradient overshoots zero and oscillates by lr x strength per step, so the lr must
        # decay (cosine) for the gammas to settle near 0; no momentum, to keep the steps plain:
        # a budget of 0.02 x 10 x 12 / 2 = 1.2, and 0.02 x 10 x 0.017 = 0.0034 for the last step.
        (
            dict(optimizer="sgd", momentum=0.0, lr=0.16, schedule="cosine"),
            SparsityConfig("l1", 10.0),
        ),
    ],
    ids=["proximal-adam", "l1-sgd"],
)
def test_a_short_sparse_fit_makes_gammas_sparse(tmp_path, train_settings, sparsity):
    config = TrainConfig(epochs=3, batch_size=4, workers=0, eval_interval=0, seed=1,
                         **train_settings)
    dense = _fit_with(tmp_path / "dense", config, None)
    sparse = _fit_with(tmp_path / "sparse", config, sparsity)
    assert dense < 0.05
    assert sparse > dense + 0.5
