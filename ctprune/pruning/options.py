"""The pruning knobs, in one place: `PruneOptions`.

`prune()` takes its keyword defaults from here, a recipe's `prune` section extends it (lists make
a sweep, see `ctprune.recipe.PruneConfig`), and `ctprune prune` builds its flags' defaults from
it, so each default is written once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

SCOPES = ("layer", "global")
ALLOCATIONS = ("uniform", "sensitivity")
LATENCY_RUNTIMES = ("torch", "onnxruntime", "cuda")
# Chosen from experiments/bench/prune/report.md: on CPU (oneDNN blocks channels by 16) widths
# that are multiples of 16 turn MAC savings into real speed-ups; odd widths waste most of them.
DEFAULT_ROUND_TO = 16


@dataclass
class PruneOptions:
    """How to prune one model: what `prune(model, ratio, criterion, ...)` is given."""

    criterion: str = "l1"
    """One of ctprune.pruning.CRITERIA: l1, l2, bn_gamma, kmeans (merges similar channels),
    random, taylor (first-order Taylor on calibration batches of the training data), hessian
    (Optimal Brain Damage with the empirical Fisher, on the same batches)."""
    ratio: float | None = 0.2
    """Fraction of channels removed, in [0, 1): of every group in layer scope, of all prunable
    channels together in global scope. None when `target_macs` is given."""
    target_macs: float | None = None
    """Instead of `ratio`: the fraction of the model's MACs to keep, in (0, 1] (the ratio is
    bisected)."""
    scope: str = "layer"
    """"layer": every group loses the ratio; "global": groups ranked together on
    mean-normalised scores."""
    max_layer_ratio: float = 0.8
    """The most any group may lose, in (0, 1)."""
    round_to: int | None = DEFAULT_ROUND_TO
    """Kept widths are multiples of this (>= 1; None: whole channels)."""
    ratio_overrides: dict = field(default_factory=dict)
    """Module-name pattern (fnmatch) -> ratio for the groups it matches, in
    [0, max_layer_ratio]."""
    allocation: str = "uniform"
    """"uniform": every group the same ratio (layer scope) or one global ranking; a budget
    bisects the ratio. "sensitivity": each group's width from its sensitivity curve measured
    on calibration batches of the training data, the least predicted loss within the budget
    (needs target_macs, target_params or target_latency)."""
    target_params: float | None = None
    """Instead of `ratio`: the fraction of the parameters to keep, in (0, 1]."""
    target_latency: float | None = None
    """Instead of `ratio`: the fraction of the parent's latency to keep, in (0, 1], on
    `runtime` with `threads` at the model's input size (predicted by the latency model, then
    measured and reported)."""
    runtime: str = "torch"
    """The runtime target_latency is measured on: torch (CPU), onnxruntime (CPU) or cuda."""
    threads: int = 1
    """The thread count target_latency is measured with (>= 1)."""
    calibration_batches: int = 8
    """Training batches the data-driven criteria (taylor, hessian) and the sensitivity
    allocation read (>= 1); the sensitivity allocation forwards all of them once per group and
    candidate width."""
    sensitivity: str | None = None
    """With allocation sensitivity: a sensitivity.json written by `ctprune sensitivity` (AP50
    lost per group and width) to allocate from, instead of measuring the loss on calibration
    batches; None: measure."""

    def __post_init__(self) -> None:
        check_options(self.criterion, self.ratio, self.target_macs, self.scope,
                      self.max_layer_ratio, self.round_to, self.ratio_overrides,
                      self.allocation, self.target_params, self.target_latency, self.runtime,
                      self.threads, self.sensitivity, self.calibration_batches)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each budget keeps a fraction of, for its error message.
BUDGETS = {"target_macs": "MACs", "target_params": "parameters", "target_latency": "latency"}


def check_options(criterion, ratio, target_macs, scope, max_layer_ratio, round_to,
                  ratio_overrides=None, allocation="uniform", target_params=None,
                  target_latency=None, runtime="torch", threads=1, sensitivity=None,
                  calibration_batches=8) -> None:
    """The checks every set of pruning options passes, `prune()`'s arguments and a recipe's
    `prune` section alike; errors start with the field's name."""
    from .criteria import check_criterion  # here, not at the top: `ctprune --help` needs no torch

    try:
        check_criterion(criterion)
    except ValueError as error:
        raise ValueError(f"criterion: {error}") from None
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    if not (_is_number(max_layer_ratio) and 0.0 < max_layer_ratio < 1.0):
        raise ValueError(f"max_layer_ratio: expected a number in (0, 1), got {max_layer_ratio!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {allocation!r}")
    budgets = {"target_macs": target_macs, "target_params": target_params,
               "target_latency": target_latency}
    given = [name for name, value in budgets.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"{given[0]}: expected one budget, got {' and '.join(given)}")
    for name in given:
        value = budgets[name]
        if not (_is_number(value) and 0.0 < value <= 1.0):
            raise ValueError(f"{name}: expected the fraction of {BUDGETS[name]} to keep, in "
                             f"(0, 1], got {value!r}")
        if ratio is not None:
            raise ValueError(f"ratio: expected None beside {name}: give either ratio or {name}, "
                             "not both")
    if allocation == "sensitivity" and not given:
        raise ValueError("allocation: expected a budget with 'sensitivity' (it needs target_macs, "
                         "target_params or target_latency)")
    if not given:
        if not (_is_number(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"ratio: expected a number in [0, 1), got {ratio!r}")
        if ratio > max_layer_ratio:
            raise ValueError(
                f"ratio: {ratio} exceeds max_layer_ratio {max_layer_ratio}, the most any layer "
                "may lose; raise max_layer_ratio to prune harder"
            )
    if runtime not in LATENCY_RUNTIMES:
        raise ValueError(f"runtime: expected one of {LATENCY_RUNTIMES}, got {runtime!r}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    if (not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool)
            or calibration_batches < 1):
        raise ValueError(f"calibration_batches: expected an integer >= 1, got "
                         f"{calibration_batches!r}")
    if sensitivity is not None:
        if allocation != "sensitivity":
            raise ValueError("sensitivity: expected allocation 'sensitivity' to read stored curves")
        if not isinstance(sensitivity, dict) and not str(sensitivity).strip():
            raise ValueError(f"sensitivity: expected the path of a sensitivity.json (or its "
                             f"curves), got {sensitivity!r}")
    if round_to is not None and (
        not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1
    ):
        raise ValueError(f"round_to: expected None or a positive integer, got {round_to!r}")
    if not isinstance(ratio_overrides, dict | None):
        raise ValueError(
            f"ratio_overrides: expected a mapping of module-name pattern -> ratio, got "
            f"{type(ratio_overrides).__name__}"
        )
    for pattern, value in (ratio_overrides or {}).items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(
                f"ratio_overrides: expected module-name patterns (fnmatch strings) as keys, got "
                f"{pattern!r}"
            )
        if not (_is_number(value) and 0.0 <= value <= max_layer_ratio):
            raise ValueError(
                f"ratio_overrides: expected a ratio in [0, max_layer_ratio = {max_layer_ratio}] "
                f"for {pattern!r}, got {value!r}"
            )


def _defaults() -> PruneOptions:
    """`PruneOptions()` without running its checks: checking the criterion imports the criteria
    and torch, which `ctprune --help` (it shows these defaults) must not. The defaults are the
    literals above; tests/test_console.py checks that they equal a checked `PruneOptions()`."""
    defaults = object.__new__(PruneOptions)
    for option in fields(PruneOptions):
        factory = option.default_factory
        value = option.default if factory is MISSING else factory()
        object.__setattr__(defaults, option.name, value)
    return defaults


DEFAULTS = _defaults()
"""The defaults, for signatures and command-line flags."""
