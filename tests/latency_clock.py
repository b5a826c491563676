"""A deterministic clock for the latency model's tests: timing on a shared machine is noise, and
speed figures belong to studies (experiments/bench/latency_model)."""

from torch import nn

import ctprune.pruning.latency as latency_module
from ctprune.pruning.latency import LatencyTable, LayerSpec, layer_specs

# A model costs its layers timed alone times this, plus REST_MS.
SCALE = 2.0
REST_MS = 0.5


def layer_cost_ms(spec: LayerSpec, in_channels: int, out_channels: int) -> float:
    """A layer costs its multiply-accumulates (per input pixel), plus a fixed overhead."""
    height, width = spec.input_hw
    return 1e-6 * in_channels * out_channels * height * width + 0.01


def model_cost_ms(model: nn.Module, input_size: tuple[int, int]) -> float:
    layers = 0.0
    for path, spec in layer_specs(model, input_size).items():
        layer = model.get_submodule(path)
        layers += layer_cost_ms(spec, layer.in_channels, layer.out_channels)
    return SCALE * layers + REST_MS


def install(monkeypatch) -> None:
    """Layer tables and whole-model measurements read the deterministic clock."""

    def measure(model, runtime="torch", threads=1, input_size=(512, 512), rounds=None,
                others=None):
        models = {"model": model, **(others or {})}
        return {name: model_cost_ms(each, tuple(input_size)) for name, each in models.items()}

    monkeypatch.setattr(LatencyTable, "_time",
                        lambda self, spec, i, o: layer_cost_ms(spec, i, o) / 1e3)
    monkeypatch.setattr(latency_module, "measure_model_ms", measure)
