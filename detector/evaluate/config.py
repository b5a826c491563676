"""The `evaluate` section of a recipe: how a model is run over the val split and scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import require_int, require_number


@dataclass
class EvaluateConfig:
    """How to evaluate a model on the val split."""

    batch_size: int = 8
    """Images per forward pass (>= 1)."""
    max_detections: int = 100
    """Detections kept per image (>= 1; the original's K)."""
    flip: bool = False
    """Flip test: heatmap and wh averaged with the mirrored pass, offset from the plain pass."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """Test scales, each > 0, at least one; several are merged with soft-NMS (the original:
    0.5, 0.75, 1, 1.25, 1.5)."""
    soft_nms: Literal["gaussian", "linear"] = "gaussian"
    """Soft-NMS variant for multi-scale merging (the original: gaussian, sigma 0.5)."""
    keep_resolution: bool | None = None
    """Test at the image's own resolution padded to a multiple of 32; None follows the
    model's input spec."""
    pr_curves: bool = True
    """Write one precision-recall curve PNG per class."""
    workers: int = 2
    """Data-loading worker processes (>= 0)."""

    def __post_init__(self) -> None:
        require_int(self.batch_size, "batch_size", 1)
        require_int(self.max_detections, "max_detections", 1)
        require_int(self.workers, "workers", 0)
        if not self.scales:
            raise ValueError("scales: expected at least one test scale, got []")
        for scale in self.scales:
            require_number(scale, "scales", above=0)
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales: expected distinct scales, got {list(self.scales)}")
