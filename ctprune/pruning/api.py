"""`prune`: the one entry point. Graph -> scores -> allocation -> selection -> pruning -> stats.

result = prune(model, 0.3, "l1")                        # every group loses 30 %
result = prune(model, 0.3, "bn_gamma", scope="global")  # 30 % of all channels, ranked together
result = prune(model, None, "l1", target_macs=0.5)      # half the MACs
result = prune(model, None, "taylor", data=batches, allocation="sensitivity",
               target_latency=0.4)                      # 40 % of the latency, least loss
result = prune_with(model, PruneOptions(ratio=0.3))     # the knobs as one object
save_checkpoint(path, result.model, config)             # config + channel plan + weights
"""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from numbers import Real

import torch
from torch import nn

from detector import count_macs, count_parameters, layer_widths, output_layers, state_dict_mib
from detector.channel_plan import ChannelPlan, apply_channel_plan

from .allocate import allocate_global, allocate_layer, match_overrides, min_keep
from .budget import WidthCost, allocate_budget, candidate_keeps, widen_for_free
from .criteria import (
    DATA_CRITERIA,
    SELECTORS,
    Selection,
    check_applicable,
    check_criterion,
    check_ties,
    keep_highest,
)
from .graph import (
    MISTRACE_HINT,
    ChannelGroup,
    build_graph,
    collect_groups,
    meta_copy,
    modes_restored,
    prune_channels,
    requires_grad_restored,
    resolve_ignored_layers,
)
from .merge import fold_into_kept
from .options import ALLOCATIONS, DEFAULTS, SCOPES, PruneOptions
from .sensitivity import curves_at, has_targets, read_scan, sensitivity_curves
from .taylor import accumulate_gradients

# Graph building traces one forward pass; at 128 px it is ~18x faster than at 512 px and gives
# the same groups (the architecture is fully convolutional).
DEFAULT_EXAMPLE_SIZE = (128, 128)
# target_macs bisection stops when the ratio interval is this narrow.
RATIO_RESOLUTION = 1e-4
# `prune` warns when it removes less than this fraction of the channels asked for.
SHORTFALL_FRACTION = 0.5
# Groups named one by one in that warning; the rest are counted.
SHORTFALL_GROUPS_NAMED = 8


class PruneShortfallWarning(UserWarning):
    """`prune` removed less than half of the channels asked for; the message names the groups
    it kept whole and why (round_to, max_layer_ratio, global ranking)."""


@dataclass
class PruneStats:
    """What pruning did, in plain Python types (`as_dict` is JSON-ready).

    MACs are counted by `detector.count_macs` (torch.utils.flop_counter, FLOPs / 2) for one
    image of ``input_size`` (height, width), the example input's size; for this fully
    convolutional model their before/after ratio is the same at any size. MiB is the fp32
    state dict as `torch.save` writes it. Widths are `detector.layer_widths` (module path ->
    [in, out] or [num_features]). ``groups`` lists every pruned group: its root layer, the
    layers writing its channels, its width and the channels kept. ``ratio`` is the ratio
    applied (found by bisection when ``target_macs`` was given). ``seconds`` is the wall time
    of the whole call, ``timings`` its parts.
    """

    criterion: str
    scope: str
    ratio: float
    round_to: int | None
    max_layer_ratio: float
    target_macs: float | None
    input_size: tuple[int, int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    mib_before: float
    mib_after: float
    seconds: float
    widths_before: dict[str, list[int]]
    widths_after: dict[str, list[int]]
    groups: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    allocation: str = "uniform"
    target_params: float | None = None
    target_latency: float | None = None
    latency: dict | None = None
    """With ``target_latency``: runtime, threads, the parent's and the pruned model's measured
    milliseconds (timed interleaved), the realised ratio and the latency model's prediction."""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """Three lines for a terminal or a report."""

        def change(before: float, after: float) -> str:
            return f"{before:,.1f} -> {after:,.1f} ({(after / before - 1) * 100:+.1f}%)"

        size = f"{self.input_size[0]}x{self.input_size[1]}"
        return "\n".join(
            [
                f"pruned with {self.criterion}, {self.scope} scope, ratio {self.ratio:.3f}, "
                f"round_to {self.round_to}, in {self.seconds:.2f} s",
                f"params (M) {change(self.params_before / 1e6, self.params_after / 1e6)}; "
                f"state dict (MiB) {change(self.mib_before, self.mib_after)}",
                f"GMACs at {size} {change(self.macs_before / 1e9, self.macs_after / 1e9)}",
                *([self.latency_line()] if self.latency else []),
            ]
        )

    def latency_line(self) -> str:
        """The realised latency beside the target."""
        latency = self.latency
        return (
            f"latency ({latency['runtime']}, {latency['threads']} threads, {self.input_size[0]}"
            f"x{self.input_size[1]}) {latency['before_ms']:.2f} -> {latency['after_ms']:.2f} ms: "
            f"realised {latency['realised']:.3f} of the parent's, target {self.target_latency}, "
            f"predicted {latency['predicted']:.3f}"
        )


@dataclass
class PruneResult:
    """The pruned model, its channel plan (module path -> widths, the layers whose widths
    differ from the model given to `prune`; None when nothing changed) and its statistics."""

    model: nn.Module
    plan: ChannelPlan | None
    stats: PruneStats


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_arguments(
    model,
    ratio,
    criterion,
    scope,
    example_inputs,
    ratio_overrides,
    max_layer_ratio,
    round_to,
    target_macs,
    data,
    allocation="uniform",
    target_params=None,
    target_latency=None,
    sensitivity=None,
) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_criterion(criterion)
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    if not _is_number(max_layer_ratio) or not 0 < max_layer_ratio < 1:
        raise ValueError(f"max_layer_ratio: expected a number in (0, 1), got {max_layer_ratio!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {allocation!r}")
    targets = {"target_macs": target_macs, "target_params": target_params,
               "target_latency": target_latency}
    given = [name for name, value in targets.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}")
    for name in given[:1]:
        value = targets[name]
        if name != "target_macs" and (not _is_number(value) or not 0 < value <= 1):
            raise ValueError(f"{name}: expected the fraction of the parent's to keep, in (0, 1], "
                             f"got {value!r}")
        if name != "target_macs":
            if ratio is not None:
                raise ValueError(f"give either ratio or {name}, not both (pass ratio=None)")
            target_macs = None  # the checks below are for a ratio; this budget is checked
            ratio = 0.0
    if allocation == "sensitivity" and not given:
        raise ValueError("allocation: 'sensitivity' needs a budget: target_macs, target_params "
                         "or target_latency")
    if target_macs is None:
        if not _is_number(ratio) or not 0 <= ratio < 1:
            raise ValueError(f"ratio: expected a number in [0, 1), got {ratio!r}")
        if ratio > max_layer_ratio:
            raise ValueError(
                f"ratio {ratio} exceeds max_layer_ratio {max_layer_ratio}, the most any layer may "
                "lose; raise max_layer_ratio to prune harder"
            )
    else:
        if ratio is not None:
            raise ValueError("give either ratio or target_macs, not both (pass ratio=None)")
        if not _is_number(target_macs) or not 0 < target_macs <= 1:
            raise ValueError(
                "target_macs: expected the fraction of MACs to keep, in (0, 1], got "
                f"{target_macs!r}"
            )
    if round_to is not None and (
        not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1
    ):
        raise ValueError(f"round_to: expected None or a positive integer, got {round_to!r}")
    if ratio_overrides is not None:
        if not isinstance(ratio_overrides, dict):
            raise ValueError(
                f"ratio_overrides: expected a dict of module-name pattern -> ratio, got "
                f"{type(ratio_overrides).__name__}"
            )
        for pattern, value in ratio_overrides.items():
            if not isinstance(pattern, str):
                raise ValueError(f"ratio_overrides: keys are module-name patterns, got {pattern!r}")
            if not _is_number(value) or not 0 <= value <= max_layer_ratio:
                raise ValueError(
                    f"ratio_overrides[{pattern!r}]: expected a ratio in [0, max_layer_ratio = "
                    f"{max_layer_ratio}], got {value!r}"
                )
    if example_inputs is not None and (
        not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4
    ):
        raise ValueError("example_inputs: expected an image batch tensor of shape (B, 3, H, W)")
    if sensitivity is not None and allocation != "sensitivity":
        raise ValueError("sensitivity: stored curves are read by allocation='sensitivity' only")
    measures = allocation == "sensitivity" and sensitivity is None
    if data is None and (criterion in DATA_CRITERIA or measures):
        user = f"the {criterion} criterion" if criterion in DATA_CRITERIA else (
            "allocation='sensitivity'")
        raise ValueError(
            f"data: {user} needs calibration batches (an iterable of training batches: dicts "
            "with 'image' and the head's targets), e.g. prune(..., data=loader)"
        )
    if data is not None and criterion not in DATA_CRITERIA and not measures:
        raise ValueError(
            f"data: the {criterion} criterion reads no data; data-driven criteria: "
            f"{', '.join(DATA_CRITERIA)} (or allocation='sensitivity' without stored curves)"
        )


def widths_after_pruning(
    widths: dict[str, list[int]], groups: list[ChannelGroup], keeps: list[int]
) -> dict[str, list[int]]:
    """The layer widths pruning to ``keeps`` will produce, without pruning: every layer writing
    a group's channels loses the removed channels from its outputs, every layer reading them
    from its inputs."""
    widths = copy.deepcopy(widths)
    for group, keep in zip(groups, keeps, strict=True):
        removed = group.width - keep
        for layer in group.producers:
            widths[layer.name][-1] -= removed
        for layer in group.norms:
            widths[layer.name][0] -= removed
        for layer in group.consumers:
            widths[layer.name][0] -= removed
    return widths


def _macs_of_widths(
    model: nn.Module, before: dict, after: dict, input_size: tuple[int, int]
) -> int:
    """MACs of ``model`` resized to ``after`` widths, counted on a meta copy (no weights)."""
    plan = {name: value for name, value in after.items() if value != before[name]}
    return count_macs(apply_channel_plan(meta_copy(model), plan), input_size)


def _kept_whole_reason(
    group: ChannelGroup, scope: str, round_to: int | None, max_layer_ratio: float
) -> str:
    """Why a group asked to lose channels kept them all (the rules of `allocate`)."""
    width = group.width
    if min_keep(width, max_layer_ratio) >= width:
        return f"max_layer_ratio={max_layer_ratio} allows removing none of {width}"
    if round_to and width <= round_to:
        return f"{width} channels, at or under round_to={round_to}"
    if round_to:
        return f"{width} channels, rounded to a multiple of round_to={round_to}"
    if scope == "global":
        return f"{width} channels, all ranked above the global cut"
    return f"{width} channels, the ratio rounds to none"


def warn_on_shortfall(
    groups: list[ChannelGroup],
    keeps: list[int],
    requested: list[float],
    scope: str,
    round_to: int | None,
    max_layer_ratio: float,
) -> None:
    """`PruneShortfallWarning` when the groups lose less than `SHORTFALL_FRACTION` of the
    channels ``requested`` (per group: the ratio asked of it), naming the groups kept whole."""
    asked = sum(ratio * group.width for ratio, group in zip(requested, groups, strict=True))
    removed = sum(group.width - keep for group, keep in zip(groups, keeps, strict=True))
    if asked <= 0 or removed >= SHORTFALL_FRACTION * asked:
        return
    whole = [
        f"{group.name} ({_kept_whole_reason(group, scope, round_to, max_layer_ratio)})"
        for group, keep, ratio in zip(groups, keeps, requested, strict=True)
        if keep == group.width and ratio > 0
    ]
    named = "; ".join(whole[:SHORTFALL_GROUPS_NAMED])
    more = len(whole) - SHORTFALL_GROUPS_NAMED
    more = f"; ... {more} more" if more > 0 else ""
    total = sum(group.width for group in groups)
    hint = (
        " Lower round_to (None prunes whole channels) for a model this narrow."
        if round_to and any(group.width <= 2 * round_to for group in groups)
        else ""
    )
    warnings.warn(
        f"prune removed {removed} of the {asked:.0f} channels asked for ({scope} scope, of "
        f"{total} prunable channels in {len(groups)} groups; output layers are never pruned): "
        f"{len(whole)} groups kept whole: {named}{more}.{hint}",
        PruneShortfallWarning,
        stacklevel=3,
    )


def _bisect_ratio(target_macs: float, high: float, macs_of, what: str = "macs") -> float:
    """The smallest ratio in [0, high] whose MACs fraction (or ``what``'s: params, latency) is
    at most ``target_macs`` (they fall monotonically with the ratio in both scopes; predicted
    latency nearly so, and the bisection then finds one crossing)."""
    if macs_of(0.0) <= target_macs:
        return 0.0
    reachable = macs_of(high)
    if reachable > target_macs:
        noun = {"macs": "MACs", "params": "parameters", "latency": "predicted latency"}[what]
        raise ValueError(
            f"target_{what} {target_macs} is out of reach: with every layer at max_layer_ratio "
            f"({high}) the model keeps {reachable:.3f} of its {noun}; raise max_layer_ratio or "
            "aim higher"
        )
    low = 0.0
    while high - low > RATIO_RESOLUTION:
        middle = (low + high) / 2
        if macs_of(middle) <= target_macs:
            high = middle
        else:
            low = middle
    return high


def prune(
    model: nn.Module,
    ratio: float | None,
    criterion: str = DEFAULTS.criterion,
    *,
    scope: str = DEFAULTS.scope,
    example_inputs: torch.Tensor | None = None,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    ratio_overrides: dict[str, float] | None = None,
    max_layer_ratio: float = DEFAULTS.max_layer_ratio,
    round_to: int | None = DEFAULTS.round_to,
    target_macs: float | None = DEFAULTS.target_macs,
    data: Iterable[dict] | None = None,
    head: str | None = None,
    inplace: bool = False,
    allocation: str = DEFAULTS.allocation,
    target_params: float | None = DEFAULTS.target_params,
    target_latency: float | None = DEFAULTS.target_latency,
    runtime: str = DEFAULTS.runtime,
    threads: int = DEFAULTS.threads,
    latency_cache: str | None = None,
    sensitivity: dict[str, dict[int, float]] | str | None = None,
    latency_model: tuple | None = None,
    calibration_batches: int = DEFAULTS.calibration_batches,
) -> PruneResult:
    """Remove channels from ``model``; everything coupled to a channel goes with it. The
    defaults are `PruneOptions`'s; `prune_with(model, options)` passes a whole options object.

    Args:
        model: a CenterNet (any model whose output layers `detector.output_layers` declares;
            those keep their output channels).
        ratio: the fraction of channels to remove, in [0, 1): of every group in ``"layer"``
            scope, of all prunable channels together in ``"global"`` scope. None when
            ``target_macs`` is given.
        criterion: a name from `criteria.CRITERIA`: "l1", "l2", "bn_gamma", "kmeans" (merges
            similar channels instead of dropping them), "random", "taylor", "hessian" (these
            two need ``data``).
        scope: "layer" (every group loses ``ratio``, rounded) or "global" (groups ranked
            together on mean-normalised scores; no group loses more than ``max_layer_ratio``).
        example_inputs: the input traced to find the coupled channels, also the size MACs are
            counted at; default a 1 x 3 x 128 x 128 batch of zeros.
        ignored_layers: module paths or modules of ``model`` whose output channels (and all
            their submodules') are kept.
        ratio_overrides: module-name pattern (fnmatch) -> ratio for the groups whose layers
            it matches (see `allocate.match_overrides`); those groups lose exactly that ratio.
        max_layer_ratio: the most any group may lose, in (0, 1).
        round_to: kept channel counts are rounded to multiples of this (see `allocate`); None
            rounds to whole channels.
        target_macs: instead of ``ratio``, the fraction of MACs to keep, in (0, 1]: the ratio
            (global or per layer, by ``scope``) is bisected until the pruned model's MACs are
            at most this fraction of the original's.
        data: calibration batches for the data-driven criteria (``"taylor"``): training
            batches (dicts with "image" and the head's targets, as the dataset collates them),
            of which the first ``calibration_batches`` are used; also what the sensitivity
            allocation measures its curves on.
        head: the model's head type (`detector.heads.HEADS`), whose loss the calibration
            batches are scored with; None reads it from the model's heads.
        inplace: prune ``model`` itself; by default a deep copy is pruned and ``model`` (often
            the distillation teacher) is left untouched.
        allocation: "uniform" (every group the same ratio in layer scope, or the global
            ranking; a budget bisects the ratio) or "sensitivity" (each group's width from its
            measured sensitivity curve on ``data``, `sensitivity.py`: the least predicted loss
            that meets the budget, `budget.allocate_budget`; needs a budget and ``data``).
        target_params: instead of ``ratio``, the fraction of parameters to keep, in (0, 1].
        target_latency: instead of ``ratio``, the fraction of the parent's latency to keep, in
            (0, 1], on ``runtime`` with ``threads`` at the example input's size, as the latency
            model (`latency.py`) predicts it; the realised latency is then measured (parent and
            pruned model interleaved) into ``stats.latency``.
        runtime: "torch" (CPU), "onnxruntime" (CPU) or "cuda": the latency budget's runtime.
        threads: the latency budget's thread count.
        latency_cache: the folder of the latency tables (None: `latency.default_cache_dir`).
        sensitivity: with ``allocation="sensitivity"``, curves measured before instead of
            measuring them on ``data``: the path of a ``sensitivity.json`` that `ctprune
            sensitivity` wrote (AP50 lost per group and width), or group name -> {kept width:
            loss}; interpolated at the candidate widths (`sensitivity.curves_at`).
        calibration_batches: how many batches of ``data`` are read.
        latency_model: with ``target_latency``, a calibrated ``(latency.LatencyModel,
            latency.LatencyTable)`` of ``model`` to use instead of calibrating one (a model
            pruned to several budgets is calibrated once); its runtime and threads win.

    Returns:
        PruneResult(model, plan, stats). Every module of the returned model is in the
        train/eval mode it had, and frozen parameters stay frozen.

    Raises:
        ValueError: bad arguments, unknown criterion, nothing prunable, bn_gamma on a model
            without BatchNorm or with untrained (all equal) gammas, unreachable target_macs,
            a pruned model (target_latency) measured slower than its parent.

    Warns:
        PruneShortfallWarning: less than half of the channels asked for were removed (e.g.
            every group of a narrow model at or under ``round_to``); it names the groups kept
            whole and why.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 4)
        return now

    _check_arguments(
        model,
        ratio,
        criterion,
        scope,
        example_inputs,
        ratio_overrides,
        max_layer_ratio,
        round_to,
        target_macs,
        data,
        allocation,
        target_params,
        target_latency,
        sensitivity,
    )
    if not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ValueError(f"calibration_batches: expected an integer >= 1, got "
                         f"{calibration_batches!r}")
    score = check_criterion(criterion)
    budget_kind, budget = next(
        ((kind, value) for kind, value in (("macs", target_macs), ("params", target_params),
                                          ("latency", target_latency)) if value is not None),
        (None, None),
    )
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("nothing to prune: the model has no parameters")
    if example_inputs is None:
        example_inputs = torch.zeros(
            1, 3, *DEFAULT_EXAMPLE_SIZE, dtype=parameter.dtype, device=parameter.device
        )
    input_size = tuple(int(side) for side in example_inputs.shape[-2:])

    working = model if inplace else copy.deepcopy(model)
    clock = lap("copy", started)
    from detector.heads import head_type, head_type_of

    loss_fn = None
    if data is not None:
        data = list(itertools.islice(data, calibration_batches))
        if any(has_targets(batch) for batch in data):
            # Scored with the model's own head loss (unlabelled batches measure output drift).
            loss_fn = head_type(head or head_type_of(model)).loss
    if criterion in DATA_CRITERIA:
        if loss_fn is None:
            raise ValueError(
                f"data: the {criterion} criterion scores channels by the loss's gradients, so its "
                "batches need the head's training targets besides 'image' (a training loader's)"
            )
        # Gradients first, outside the graph's trace (it detaches deformable convs' offsets).
        accumulate_gradients(working, data, loss_fn, squared=criterion == "hessian")
        clock = lap("gradients", clock)
    with modes_restored(working), requires_grad_restored(working), torch.inference_mode(False):
        widths_before = layer_widths(working)
        params_before = count_parameters(working)
        mib_before = state_dict_mib(working)
        macs_before = count_macs(meta_copy(working), input_size)
        outputs = [(layer, layer.out_channels) for layer in output_layers(working)]
        clock = lap("stats_before", clock)

        graph = build_graph(working, example_inputs)
        ignored = resolve_ignored_layers(working, ignored_layers, model)
        groups = collect_groups(graph, working, ignored)
        if not groups:
            raise ValueError(
                "nothing to prune: every layer's output channels are model outputs or ignored"
            )
        overrides = match_overrides(groups, ratio_overrides)
        check_applicable(criterion, groups)
        clock = lap("graph", clock)

        need_scores = (
            scope == "global" or criterion not in SELECTORS or allocation == "sensitivity"
        )
        scores = [score(group) for group in groups] if need_scores else [None] * len(groups)
        if need_scores:
            check_ties(criterion, groups, scores)
        if criterion in DATA_CRITERIA:
            working.zero_grad(set_to_none=True)  # the calibration gradients are spent
        clock = lap("scores", clock)

        def allocate(applied_ratio: float) -> list[int]:
            if scope == "global":
                return allocate_global(
                    groups, scores, applied_ratio, overrides, round_to, max_layer_ratio
                )
            return allocate_layer(groups, applied_ratio, overrides, round_to, max_layer_ratio)

        latency = None
        if budget_kind == "latency":
            if latency_model is None:
                latency = _latency_model(working, groups, widths_before, input_size, runtime,
                                         threads, latency_cache)
            else:
                latency = latency_model
                runtime, threads = latency[1].runtime, latency[1].threads
            clock = lap("latency_model", clock)
        cost = None
        if budget_kind is not None:
            cost = WidthCost(budget_kind, working, widths_before, input_size, latency)

            def fraction(keeps: list[int]) -> float:
                return cost(widths_after_pruning(widths_before, groups, keeps)) / cost.parent

        curves = None
        if allocation == "sensitivity":
            candidates = [candidate_keeps(group.width, round_to, max_layer_ratio)
                          for group in groups]
            for index, value in overrides.items():  # an override fixes the group's width
                candidates[index] = [allocate_layer([groups[index]], value, {}, round_to,
                                                    max_layer_ratio)[0]]
            if sensitivity is not None:
                stored = sensitivity if isinstance(sensitivity, dict) else read_scan(sensitivity)
                curves = curves_at(stored, groups, candidates)
            else:
                curves = _measured_curves(working, groups, scores, candidates, data, loss_fn)
            clock = lap("sensitivity", clock)
            keeps = allocate_budget(groups, candidates, curves, fraction, budget)
            ratio = 1 - sum(keeps) / sum(group.width for group in groups)
            clock = lap("allocate", clock)
        else:
            if budget_kind == "macs":

                def budget_fraction(applied_ratio: float) -> float:
                    after = widths_after_pruning(widths_before, groups, allocate(applied_ratio))
                    return _macs_of_widths(working, widths_before, after, input_size) / macs_before

            elif budget_kind is not None:

                def budget_fraction(applied_ratio: float) -> float:
                    return fraction(allocate(applied_ratio))

            if budget_kind is not None:
                ratio = _bisect_ratio(budget, max_layer_ratio, budget_fraction, budget_kind)
                clock = lap(f"target_{budget_kind}", clock)
            keeps = allocate(ratio)
            if budget_kind == "latency":
                # A uniform width no faster than a wider one gives its channels back.
                candidates = [candidate_keeps(group.width, round_to, max_layer_ratio)
                              for group in groups]
                for index, keep in enumerate(keeps):
                    if keep not in candidates[index]:
                        candidates[index] = sorted({*candidates[index], keep})
                keeps = widen_for_free(candidates, keeps, fraction)
            if budget_kind is None:  # a budget that cannot be met raises in _bisect_ratio
                requested = [overrides.get(index, ratio) for index in range(len(groups))]
                warn_on_shortfall(groups, keeps, requested, scope, round_to, max_layer_ratio)
        predicted = fraction(keeps) if budget_kind == "latency" else None

        select = SELECTORS.get(criterion, keep_highest)
        selections: list[Selection] = [
            select(group, group_scores, keep)
            for group, group_scores, keep in zip(groups, scores, keeps, strict=True)
        ]
        clock = lap("select", clock)

        # Fold every group before pruning any: folding changes values only, so each group's
        # channel indices in its consumers are still the ones collected above.
        for group, selection in zip(groups, selections, strict=True):
            fold_into_kept(group, selection.merged)
        with torch.no_grad():
            for group, selection in zip(groups, selections, strict=True):
                kept = set(selection.kept)
                prune_channels(graph, group, [c for c in range(group.width) if c not in kept])
        clock = lap("prune", clock)

        widths_after = layer_widths(working)
        changed = [layer for layer, channels in outputs if layer.out_channels != channels]
        if changed:  # a bug, never a user error: output layers are never in a group
            raise RuntimeError(f"pruning changed the output channels of {changed}")
        try:  # one forward pass on a meta copy: every layer's widths must fit its neighbours'
            macs_after = count_macs(meta_copy(working), input_size)
        except RuntimeError as error:
            raise ValueError(
                f"the pruned model does not run ({str(error).splitlines()[0]}): torch-pruning "
                f"mis-traced this model ({MISTRACE_HINT})"
            ) from None
        stats = PruneStats(
            criterion=criterion,
            scope=scope,
            ratio=float(ratio),
            round_to=round_to,
            max_layer_ratio=float(max_layer_ratio),
            target_macs=None if target_macs is None else float(target_macs),
            input_size=input_size,
            params_before=params_before,
            params_after=count_parameters(working),
            macs_before=macs_before,
            macs_after=macs_after,
            mib_before=mib_before,
            mib_after=state_dict_mib(working),
            seconds=0.0,
            widths_before=widths_before,
            widths_after=widths_after,
            groups=[
                {
                    "name": group.name,
                    "layers": group.output_layer_names,
                    "width": group.width,
                    "kept": len(selection.kept),
                }
                for group, selection in zip(groups, selections, strict=True)
            ],
            timings=timings,
            allocation=allocation,
            target_params=None if target_params is None else float(target_params),
            target_latency=None if target_latency is None else float(target_latency),
        )
        if curves is not None:
            for entry, curve in zip(stats.groups, curves, strict=True):
                entry["sensitivity"] = {str(keep): loss for keep, loss in sorted(curve.items())}
        clock = lap("stats_after", clock)
        if budget_kind == "latency":
            stats.latency = _realised_latency(model, working, runtime, threads, input_size,
                                              predicted)
            lap("latency", clock)
    plan = {name: value for name, value in widths_after.items() if value != widths_before[name]}
    stats.seconds = round(time.perf_counter() - started, 4)
    return PruneResult(working, plan or None, stats)


def prune_with(
    model: nn.Module,
    options: PruneOptions,
    *,
    example_inputs: torch.Tensor | None = None,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    data: Iterable[dict] | None = None,
    head: str | None = None,
    inplace: bool = False,
) -> PruneResult:
    """`prune` with the knobs of ``options`` (a recipe's branch, the command line's flags)."""
    return prune(
        model,
        options.ratio,
        options.criterion,
        scope=options.scope,
        example_inputs=example_inputs,
        ignored_layers=ignored_layers,
        ratio_overrides=options.ratio_overrides or None,
        max_layer_ratio=options.max_layer_ratio,
        round_to=options.round_to,
        target_macs=options.target_macs,
        data=data,
        head=head,
        inplace=inplace,
        allocation=options.allocation,
        target_params=options.target_params,
        target_latency=options.target_latency,
        runtime=options.runtime,
        threads=options.threads,
        sensitivity=options.sensitivity,
        calibration_batches=options.calibration_batches,
    )


def _latency_model(model, groups, widths_before, input_size, runtime, threads, cache):
    """(LatencyModel, LatencyTable) of ``model`` on ``runtime``; the probe that splits the rest
    of the forward into fixed and scaling parts is the model with every group halved."""
    from .latency import LatencyModel, LatencyTable

    table = LatencyTable(runtime, threads, input_size, cache_dir=cache)
    halves = [max(1, group.width // 2) for group in groups]
    plan = widths_after_pruning(widths_before, groups, halves)
    probe = apply_channel_plan(copy.deepcopy(model),
                               {k: v for k, v in plan.items() if v != widths_before[k]})
    latency = LatencyModel.calibrate(model, table, probe)
    return latency, table


def _measured_curves(model, groups, scores, candidates, batches, loss_fn) -> list:
    """`sensitivity_curves` with a progress bar when it takes more than a few seconds (a group
    times a width times the calibration batches: minutes on CPU)."""
    from tqdm import tqdm

    from .recalibrate import PROGRESS_DELAY_SECONDS

    total = sum(len(options) - 1 for options in candidates)
    with tqdm(total=total, desc="sensitivity", unit="point", delay=PROGRESS_DELAY_SECONDS,
              leave=False) as bar:
        return sensitivity_curves(model, groups, scores, candidates, batches, loss_fn,
                                  progress=lambda done, _: bar.update(done - bar.n))


def _realised_latency(parent, pruned, runtime, threads, input_size, predicted) -> dict:
    """The parent's and the pruned model's latency, timed interleaved; a pruned model slower
    than its parent is an error (pruning for latency that makes a model slower is a bug in the
    latency model or a runtime that cannot use the widths, never what the user wants)."""
    from .latency import measure_model_ms

    measured = measure_model_ms(parent, runtime, threads, input_size, others={"pruned": pruned})
    before, after = measured["model"], measured["pruned"]
    if after > before:
        raise ValueError(
            f"the pruned model is slower than its parent on {runtime} with {threads} threads "
            f"({after:.2f} ms against {before:.2f} ms at {input_size[0]}x{input_size[1]}); try "
            "another round_to or runtime"
        )
    return {"runtime": runtime, "threads": threads, "before_ms": round(before, 4),
            "after_ms": round(after, 4), "realised": round(after / before, 4),
            "predicted": round(predicted, 4)}
