"""Network slimming: sparsity training of the BatchNorm scales (gammas).

Liu et al., "Learning Efficient Convolutional Networks through Network Slimming" (ICCV 2017)
add ``strength * sum |gamma|`` over every BatchNorm scale to the training loss. Channels the
task does not need are driven towards gamma = 0, so the ``bn_gamma`` pruning criterion (which
ranks channels by |gamma|) then has a real ranking to act on: on freshly initialised BNs every
gamma is 1 and the scores tie (torch_pruning reference, section 0 item 5).

Two ways to apply the penalty, both as callables for `detector.engine.fit.fit`:

- ``"l1"``, the paper's: after ``loss.backward()`` add the subgradient ``strength * sign(gamma)``
  to each gamma's gradient. Meant for SGD, where it moves each gamma by ``lr * strength`` per
  step (up to ``1 / (1 - momentum)`` times that with momentum).
- ``"proximal"``: after each optimiser step, soft-threshold the gammas,
  ``gamma <- sign(gamma) * max(|gamma| - lr * strength, 0)``, the proximal operator of the L1
  penalty. Adam divides every gradient by its running RMS, which rescales an added subgradient
  away; a shrinkage applied outside the optimiser keeps its size (AdamW decouples its weight
  decay for the same reason). It also sets gammas to exactly 0, not merely near it.

How far the penalty can move a gamma over a run is ``strength * sum of the per-step learning
rates``: a channel the loss does not defend reaches 0 only when that budget exceeds its initial
|gamma| (1.0 for fresh BNs); `lr_sum` computes that sum for a `TrainConfig`. With Adam, whose
steps are at most about ``lr`` each, a proximal strength of 1 or more shrinks every gamma faster
than the loss can defend it, so useful values lie well below 1, and short schedules cannot be
slimmed at all. See experiments/slimming_study/report.md for the figures behind the defaults.

Every affine BatchNorm is regularised (in CenterNet ResNets: the trunk and the deconv neck; the
heads have none). Gammas of BNs that feed a residual add are coupled across their block; that is
the pruning engine's business (it groups them), so here each gamma is simply penalised.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from detector.engine.config import TrainConfig
from detector.engine.optim import lr_factor

ModelCallback = Callable[[nn.Module], None]

# The paper's strength for SGD (its CIFAR and ImageNet runs use 1e-4 or 1e-5).
DEFAULT_L1_STRENGTH = 1e-4
# A fraction of Adam's per-step movement (about lr). With the default full schedule (lr sum 43
# on COCO) it gives a shrinkage budget of 4.3; experiments/slimming_study/report.md measured the
# budget rule and the AP cost of strengths near 1, but not this value on a full schedule.
DEFAULT_PROXIMAL_STRENGTH = 0.1
DEFAULT_STRENGTH = {"l1": DEFAULT_L1_STRENGTH, "proximal": DEFAULT_PROXIMAL_STRENGTH}


@dataclass
class SparsityConfig:
    """L1 sparsity on the BatchNorm scales during training (network slimming)."""

    method: Literal["l1", "proximal"] = "proximal"
    """"l1": the paper's subgradient, grad += strength * sign(gamma) after backward, for SGD;
    "proximal": gamma <- sign(gamma) * max(|gamma| - lr * strength, 0) after each optimiser
    step, which also works with Adam (whose per-parameter scaling defeats a plain subgradient)."""
    strength: float | None = None
    """The L1 coefficient s (finite, >= 0); None takes the method's default (1e-4 for l1, the
    paper's; 0.1 for proximal, for full-length schedules: see `lr_sum` and
    experiments/slimming_study/report.md)."""
    exclude: list[str] = field(default_factory=list)
    """Module-name patterns (fnmatch, e.g. "neck.*", "backbone.layer4.*") of BatchNorms to
    leave dense. Each must match at least one affine BatchNorm of the model."""

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_STRENGTH:
            raise ValueError(f"method: expected 'l1' or 'proximal', got {self.method!r}")
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH[self.method]
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"strength: expected a number >= 0, got {self.strength!r}")
        if not 0 <= self.strength < math.inf:  # also catches NaN
            raise ValueError(f"strength: expected a number >= 0, got {self.strength!r}")
        self.strength = float(self.strength)
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(
                f"exclude: expected a list of module-name patterns, got {self.exclude!r}"
            )
        self.exclude = list(self.exclude)


def affine_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm with a learnable scale (BatchNorm1d/2d/3d, SyncBatchNorm), as
    (qualified module name, module) in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.weight is not None
    ]


def regularized_batchnorms(
    model: nn.Module, exclude: Sequence[str] = ()
) -> list[tuple[str, _BatchNorm]]:
    """The affine BatchNorms whose names match none of the ``exclude`` patterns."""
    return [
        (name, module)
        for name, module in affine_batchnorms(model)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    ]


def _check_exclude(model: nn.Module, exclude: Sequence[str]) -> None:
    names = [name for name, _ in affine_batchnorms(model)]
    if not names:
        raise ValueError("sparsity training: the model has no affine BatchNorm layer to regularise")
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"sparsity.exclude: pattern {pattern!r} matches no affine BatchNorm; "
                f"their names are like {shown}"
            )
    if not regularized_batchnorms(model, exclude):
        raise ValueError(
            f"sparsity.exclude: the patterns {list(exclude)} leave no BatchNorm to regularise"
        )


def sparsity_callbacks(
    model: nn.Module,
    config: SparsityConfig,
    optimizer_lr: Callable[[], float] | float,
) -> tuple[ModelCallback | None, ModelCallback | None]:
    """The ``(after_backward, after_step)`` pair to pass to `fit`; one of them is None.

    ``l1`` returns an ``after_backward`` that adds ``strength * sign(gamma)`` to every
    regularised gamma's gradient. `fit` calls it after ``scaler.unscale_(optimizer)`` whenever
    an after_backward is given, so under AMP it adds to the true (unscaled) gradients and the
    penalty is not divided by the loss scale; gradient clipping runs after it, so the penalty
    counts in the clipped norm. ``optimizer_lr`` is not used.

    ``proximal`` returns an ``after_step`` that soft-thresholds every regularised gamma by
    ``optimizer_lr() * strength``, called once per step (a constant lr may be given as a
    number). `fit` builds its optimiser inside and calls ``after_step(model)`` only, so wire
    the learning rate without an optimiser handle: ``scheduled_lr(train_config,
    len(train_loader), start_epoch)`` replays fit's own schedule, one step per call. Under AMP
    a step the scaler skipped (inf gradients) is still followed by one shrinkage, a rare and
    harmless extra.

    Both callables take the model `fit` passes (unwrapped from DDP) and look its BatchNorms up
    on each call, so they keep working if parameters are replaced; under DDP every rank applies
    the same change to its (identical) gammas and gradients. Gammas that do not require
    gradients (frozen) or got no gradient are left alone. ``model`` is only used to check the
    ``exclude`` patterns.
    """
    _check_exclude(model, config.exclude)
    strength, exclude = config.strength, list(config.exclude)

    if config.method == "l1":

        @torch.no_grad()
        def add_l1_subgradient(model: nn.Module) -> None:
            for _, norm in regularized_batchnorms(model, exclude):
                gamma = norm.weight
                if gamma.requires_grad and gamma.grad is not None:
                    gamma.grad.add_(torch.sign(gamma), alpha=strength)

        return add_l1_subgradient, None

    learning_rate = optimizer_lr if callable(optimizer_lr) else (lambda: float(optimizer_lr))

    @torch.no_grad()
    def soft_threshold(model: nn.Module) -> None:
        lr = float(learning_rate())
        if not lr >= 0:
            raise ValueError(f"sparsity (proximal): the learning rate getter returned {lr!r}")
        threshold = lr * strength
        for _, norm in regularized_batchnorms(model, exclude):
            gamma = norm.weight
            if gamma.requires_grad:
                gamma.copy_(torch.sign(gamma) * torch.clamp(gamma.abs() - threshold, min=0))

    return None, soft_threshold


def scheduled_lr(
    config: TrainConfig, steps_per_epoch: int, start_epoch: int = 0
) -> Callable[[], float]:
    """A getter of the learning rate `fit` uses at each successive optimiser step: the first
    call returns the lr of the first step after ``start_epoch`` completed epochs (0 for a fresh
    run, the resumed epoch when resuming), each call advances one step.

    It replays fit's schedule (``config.scaled_lr() * lr_factor(config, step /
    steps_per_epoch)``, what `build_scheduler`'s LambdaLR sets before step ``step``), so give it
    to exactly one consumer that calls it once per step, such as the proximal ``after_step``.
    Reading ``optimizer.param_groups[0]["lr"]`` inside ``after_step`` would instead give the
    next step's lr, because fit steps the scheduler before calling after_step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected an integer >= 1, got {steps_per_epoch}")
    if start_epoch < 0:
        raise ValueError(f"start_epoch: expected an integer >= 0, got {start_epoch}")
    step = start_epoch * steps_per_epoch - 1

    def next_lr() -> float:
        nonlocal step
        step += 1
        return config.scaled_lr() * lr_factor(config, step / steps_per_epoch)

    return next_lr


def lr_sum(config: TrainConfig, steps_per_epoch: int) -> float:
    """The sum of the per-step learning rates of a whole `fit` run: a proximal penalty can move
    a gamma by at most ``strength * lr_sum`` (l1 with SGD: up to ``1 / (1 - momentum)`` times
    that), so a channel the loss does not defend reaches 0 only if this exceeds its |gamma|."""
    next_lr = scheduled_lr(config, steps_per_epoch)
    return sum(next_lr() for _ in range(config.epochs * steps_per_epoch))


# Quantiles of |gamma| reported by `bn_gamma_statistics`: name -> q.
GAMMA_QUANTILES = {
    "min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0
}


@torch.no_grad()
def bn_gamma_statistics(model: nn.Module, threshold: float = 1e-2) -> dict:
    """How sparse the BatchNorm scales are, over every affine BatchNorm of ``model``.

    Returns plain Python numbers: ``layers`` and ``channels`` (counts), ``threshold``,
    ``below_threshold`` (channels with |gamma| < threshold) and its ``share_below_threshold``,
    ``exactly_zero`` (channels with gamma == 0, what the proximal method produces),
    ``quantiles`` of |gamma| (``min``, ``p10``, ``p25``, ``p50``, ``p75``, ``p90``, ``max``,
    linear interpolation) and ``per_layer_share_below`` (module name -> share).
    """
    if not threshold > 0:
        raise ValueError(f"threshold: expected a positive number, got {threshold!r}")
    norms = affine_batchnorms(model)
    if not norms:
        raise ValueError("bn_gamma_statistics: the model has no affine BatchNorm layer")
    # Counts compare in float32, the gammas' own precision, where a gamma set to 0.01 equals
    # the threshold 0.01 (in float64 it would fall just below it); quantiles use float64.
    magnitudes = [norm.weight.detach().float().abs().cpu() for _, norm in norms]
    every = torch.cat(magnitudes)
    below = int((every < threshold).sum())
    levels = torch.tensor(list(GAMMA_QUANTILES.values()), dtype=torch.float64)
    values = torch.quantile(every.double(), levels).tolist()
    return {
        "layers": len(norms),
        "channels": every.numel(),
        "threshold": threshold,
        "below_threshold": below,
        "share_below_threshold": below / every.numel(),
        "exactly_zero": int((every == 0).sum()),
        "quantiles": dict(zip(GAMMA_QUANTILES, values, strict=True)),
        "per_layer_share_below": {
            name: float((magnitude < threshold).float().mean())
            for (name, _), magnitude in zip(norms, magnitudes, strict=True)
        },
    }
