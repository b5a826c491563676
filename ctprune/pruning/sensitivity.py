"""Per-group sensitivity curves: how much worse the model gets when one group alone keeps fewer
channels, measured on calibration batches carved from the training data.

A group is narrowed *in place and reversibly*: the input weights with which every consumer reads
the removed channels are zeroed (and restored afterwards). Nothing downstream then sees those
channels, so the outputs are exactly those of the model with the channels pruned, without
rebuilding anything (what a channel's own BatchNorm or residual partners do with it is read by
no one). The channels removed are the criterion's lowest-scoring ones, as pruning would choose.

The measure is the head type's loss on the batches when they carry targets (a "heatmap" key),
else the output drift: the mean squared change of every output divided by its mean square in
the unpruned model, summed over outputs. A curve is made monotone (narrower never predicted to
hurt less, a running maximum from wide to narrow): the measured differences of nearby widths are
within calibration noise, and the allocator must not buy width that seems to help.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .criteria import keep_highest
from .graph import ChannelGroup, input_weight_dim, is_depthwise, output_filters
from .taylor import _to_device


@contextmanager
def channels_unread(group: ChannelGroup, removed: list[int]) -> Iterator[None]:
    """Within the block, no consumer reads the group's ``removed`` channels (root indices): their
    input weights are zero (a depthwise consumer: its filters for them, and its bias)."""
    saved = []
    with torch.no_grad():
        for layer in group.consumers:
            module = layer.module
            index = layer.channels[removed].to(module.weight.device)
            dim = 0 if is_depthwise(module) else input_weight_dim(module)
            saved.append((module.weight, dim, index, module.weight.index_select(dim, index)))
            module.weight.index_fill_(dim, index, 0.0)
            if is_depthwise(module) and module.bias is not None:
                saved.append((module.bias, 0, index, module.bias.index_select(0, index)))
                module.bias.index_fill_(0, index, 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, dim, index, values in reversed(saved):
                tensor.index_copy_(dim, index, values)


def has_targets(batch: dict) -> bool:
    """A calibration batch with a head's training targets besides its images (else unlabelled:
    sensitivity measures output drift)."""
    return any(key not in ("image", "meta") for key in batch)


def _measure(model: nn.Module, batches: list[dict], loss_fn, reference: list | None) -> float:
    """Mean over batches of the loss (batches with targets) or of the output drift against
    ``reference`` (the unpruned model's outputs per batch); without a reference, the outputs
    are returned instead (for the unpruned model)."""
    total = 0.0
    outputs_per_batch = []
    for index, batch in enumerate(batches):
        outputs = model(batch["image"])
        if has_targets(batch):
            total += float(loss_fn(outputs, batch)[0])
        elif reference is None:
            outputs_per_batch.append(outputs)
        else:
            drift = 0.0
            for stack, expected_stack in zip(outputs, reference[index], strict=True):
                for name, expected in expected_stack.items():
                    scale = expected.pow(2).mean().clamp_min(1e-12)
                    drift += float((stack[name] - expected).pow(2).mean() / scale)
            total += drift
    if reference is None and outputs_per_batch:
        return outputs_per_batch  # type: ignore[return-value]
    return total / len(batches)


def sensitivity_curves(
    model: nn.Module,
    groups: list[ChannelGroup],
    scores: list[Tensor],
    candidates: list[list[int]],
    batches: list[dict],
    loss_fn: Callable,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[int, float]]:
    """Per group, candidate width -> increase of the measure (module docstring) when that group
    alone keeps that many channels (its highest-scoring ones); 0 at the full width.

    ``batches`` are calibration batches (dicts with "image", and targets for the loss);
    ``progress(done, total)`` is called after every measurement."""
    parameter = next(model.parameters())
    batches = [_to_device(batch, parameter.device) for batch in batches]
    if not batches:
        raise ValueError("data: no calibration batch; the sensitivity allocation needs some")
    was_training = model.training
    model.eval()
    total = sum(len(options) - 1 for options in candidates)
    done = 0
    curves = []
    try:
        with torch.no_grad():
            reference = _measure(model, batches, loss_fn, None)
            if isinstance(reference, list):
                base, outputs = 0.0, reference
            else:
                base, outputs = reference, None
            for group, group_scores, options in zip(groups, scores, candidates, strict=True):
                if group_scores is None:  # criteria that choose channels themselves
                    group_scores = output_filters(group.producers[0]).abs().sum(dim=1)
                curve = {group.width: 0.0}
                for keep in sorted(options[:-1], reverse=True):
                    kept = set(keep_highest(group, group_scores, keep).kept)
                    removed = [c for c in range(group.width) if c not in kept]
                    with channels_unread(group, removed):
                        measured = _measure(model, batches, loss_fn, outputs)
                    # Monotone: a running maximum from wide to narrow (module docstring).
                    curve[keep] = max(measured - base, max(curve.values()))
                    done += 1
                    if progress is not None:
                        progress(done, total)
                curves.append(curve)
    finally:
        model.train(was_training)
    return curves


def read_scan(path) -> dict[str, dict[int, float]]:
    """Group name -> {kept width: loss} from a ``sensitivity.json`` that `ctprune sensitivity`
    wrote (its losses: AP50 lost or output drift)."""
    import json
    from pathlib import Path

    state = json.loads(Path(path).read_text())
    if not isinstance(state, dict) or "groups" not in state:
        raise ValueError(f"sensitivity: {path} is not a scan of `ctprune sensitivity`")
    return {name: {int(point["keep"]): float(point["loss"])
                   for point in entry["points"].values()}
            for name, entry in state["groups"].items()}


def curves_at(
    stored: dict[str, dict[int, float]], groups: list[ChannelGroup], candidates: list[list[int]]
) -> list[dict[int, float]]:
    """Stored curves (group name -> {kept width: loss}, e.g. `read_scan`'s) at each group's
    candidate widths: linear in the width between stored points, 0 at the full width, the
    narrowest stored loss extrapolated along its last segment below it; then made monotone as
    measured curves are (module docstring).

    Raises:
        ValueError: a group the stored curves do not name (a scan of another model).
    """
    curves = []
    for group, options in zip(groups, candidates, strict=True):
        if group.name not in stored:
            raise ValueError(
                f"sensitivity: no curve for group {group.name}; the scan is of another model "
                f"(it names {', '.join(list(stored)[:3])}, ...)"
            )
        points = sorted({group.width: 0.0, **stored[group.name]}.items())
        curve = {}
        for keep in sorted(options, reverse=True):
            lower = [(w, loss) for w, loss in points if w <= keep]
            upper = [(w, loss) for w, loss in points if w >= keep]
            if lower and upper:
                (w0, l0), (w1, l1) = lower[-1], upper[0]
                value = l0 if w1 == w0 else l0 + (l1 - l0) * (keep - w0) / (w1 - w0)
            else:  # narrower than every stored point: the last segment, extended
                (w0, l0), (w1, l1) = points[0], points[min(1, len(points) - 1)]
                slope = 0.0 if w1 == w0 else (l1 - l0) / (w1 - w0)
                value = l0 + slope * (keep - w0)
            curve[keep] = max(value, max(curve.values(), default=0.0))
        curves.append(curve)
    return curves


def measured_curves(model, groups, scores, candidates, batches, loss_fn) -> list:
    """`sensitivity_curves` with a progress bar when it takes more than a few seconds (a group
    times a width times the calibration batches: minutes on CPU)."""
    from tqdm import tqdm

    from .recalibrate import PROGRESS_DELAY_SECONDS

    total = sum(len(options) - 1 for options in candidates)
    with tqdm(total=total, desc="sensitivity", unit="point", delay=PROGRESS_DELAY_SECONDS,
              leave=False) as bar:
        return sensitivity_curves(model, groups, scores, candidates, batches, loss_fn,
                                  progress=lambda done, _: bar.update(done - bar.n))
