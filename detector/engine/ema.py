"""An exponential moving average of a model's weights, updated after each optimiser step.

The average is a full copy of the model (so it is evaluated and saved like any model): its
floating-point parameters follow ``average += (1 - decay) x (weights - average)``, its buffers
(BatchNorm running statistics, batch counters) are copied from the model, as they are averages
already. Early steps use the smaller decay ``(1 + n) / (10 + n)`` after ``n`` updates (TensorFlow's
``num_updates`` warm-up): a fixed 0.9998 would keep the random initial weights for thousands of
steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """``model``: the plain model (not a DistributedDataParallel wrapper); ``decay`` in (0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (call after each optimiser step)."""
        self.updates += 1
        weight = 1 - self.current_decay()
        for average, value in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(value.detach(), weight)
        for average, value in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(value)

    def state_dict(self) -> dict:
        """Tensors and plain numbers only (for resume.pt, read with weights_only=True)."""
        weights = {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}
        return {"decay": self.decay, "updates": self.updates, "weights": weights}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
