"""What `prune` returns and reports: `PruneResult` (the pruned model, its channel plan, its
`PruneStats`) and the warning when far fewer channels were removed than asked for."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

from torch import nn

from detector.channel_plan import ChannelPlan

from .allocate import min_keep
from .graph import ChannelGroup

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
