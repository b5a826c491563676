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
from collections.abc import Iterable

import torch
from torch import nn

from detector import count_macs, count_parameters, layer_widths, output_layers, state_dict_mib

from .allocate import allocate_global, allocate_layer, match_overrides
from .budget import (
    WidthCost,
    allocate_budget,
    bisect_ratio,
    candidate_keeps,
    macs_of_widths,
    widen_for_free,
    widths_after_pruning,
)
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
    build_graph,
    collect_groups,
    meta_copy,
    modes_restored,
    prune_channels,
    requires_grad_restored,
    resolve_ignored_layers,
)
from .latency import calibrated_latency_model, meet_measured_latency, realised_latency
from .merge import fold_into_kept
from .options import DEFAULTS, PruneOptions, check_options
from .result import (  # noqa: F401 (PruneShortfallWarning: re-exported, prune() raises it)
    PruneResult,
    PruneShortfallWarning,
    PruneStats,
    warn_on_shortfall,
)
from .sensitivity import curves_at, has_targets, measured_curves, read_scan
from .taylor import accumulate_gradients

# Graph building traces one forward pass; at 128 px it is ~18x faster than at 512 px and gives
# the same groups (the architecture is fully convolutional).
DEFAULT_EXAMPLE_SIZE = (128, 128)



def _check_arguments(model, example_inputs, data, criterion, allocation, sensitivity,
                     **options) -> None:
    """`prune()`'s arguments: the options (`check_options`), then what only a call has: the
    model, the example inputs, calibration data where (and only where) it is read."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_options(criterion=criterion, allocation=allocation, sensitivity=sensitivity, **options)
    if example_inputs is not None and (
        not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4
    ):
        raise ValueError("example_inputs: expected an image batch tensor of shape (B, 3, H, W)")
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
        model, example_inputs, data, criterion, allocation, sensitivity, ratio=ratio,
        target_macs=target_macs, scope=scope, max_layer_ratio=max_layer_ratio,
        round_to=round_to, ratio_overrides=ratio_overrides, target_params=target_params,
        target_latency=target_latency, runtime=runtime, threads=threads,
        calibration_batches=calibration_batches,
    )
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
    # The realised latency times the parent beside the pruned model: in place, a copy of it.
    parent = copy.deepcopy(model) if inplace and budget_kind == "latency" else model
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
                latency = calibrated_latency_model(working, groups, widths_before, input_size,
                                                   runtime, threads, latency_cache)
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
                curves = measured_curves(working, groups, scores, candidates, data, loss_fn)
            clock = lap("sensitivity", clock)

        def keeps_for(target: float | None) -> list[int]:
            """Each group's width for a budget of ``target`` (None: the ratio given)."""
            nonlocal ratio
            if allocation == "sensitivity":
                keeps = allocate_budget(groups, candidates, curves, fraction, target)
                ratio = 1 - sum(keeps) / sum(group.width for group in groups)
                return keeps
            if budget_kind == "macs":

                def budget_fraction(applied_ratio: float) -> float:
                    after = widths_after_pruning(widths_before, groups, allocate(applied_ratio))
                    return macs_of_widths(working, widths_before, after, input_size) / macs_before

            elif budget_kind is not None:

                def budget_fraction(applied_ratio: float) -> float:
                    return fraction(allocate(applied_ratio))

            if budget_kind is not None:
                ratio = bisect_ratio(target, max_layer_ratio, budget_fraction, budget_kind)
            keeps = allocate(ratio)
            if budget_kind == "latency":
                # A uniform width no faster than a wider one gives its channels back.
                options = [sorted({*candidate_keeps(group.width, round_to, max_layer_ratio), keep})
                           for group, keep in zip(groups, keeps, strict=True)]
                keeps = widen_for_free(options, keeps, fraction)
            return keeps

        keeps = keeps_for(budget)
        clock = lap("allocate" if budget_kind is None else f"target_{budget_kind}", clock)
        if budget_kind is None:  # a budget that cannot be met raises in bisect_ratio
            requested = [overrides.get(index, ratio) for index in range(len(groups))]
            warn_on_shortfall(groups, keeps, requested, scope, round_to, max_layer_ratio)
        corrections = None
        if budget_kind == "latency":
            keeps, corrections = meet_measured_latency(
                working, groups, widths_before, keeps, keeps_for, fraction, budget, runtime,
                threads, input_size)
            clock = lap("latency_measured", clock)
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
            stats.latency = realised_latency(parent, working, runtime, threads, input_size,
                                              predicted) | {"corrections": corrections}
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
