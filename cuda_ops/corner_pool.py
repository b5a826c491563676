"""Corner pooling (CornerNet, Law & Deng 2018) and center pooling (CenterNet keypoint triplets,
Duan et al. 2019) as running maxima: `torch.cummax` along one axis, between two flips when the
maximum runs against the axis. Differentiable on CPU and CUDA with no compiled kernel.

On a B x C x H x W map, at every pixel (y, x):

- ``top_pool``: the max of the pixel and everything below it, max over y' >= y of x[y', x];
- ``bottom_pool``: the max over y' <= y (everything above);
- ``left_pool``: the max over x' >= x (everything to the right);
- ``right_pool``: the max over x' <= x (everything to the left);
- ``center_pool(vertical, horizontal)``: the max of the whole column of ``vertical`` plus the
  max of the whole row of ``horizontal`` (the original applies the two to two conv branches;
  ``horizontal`` defaults to ``vertical``).

The names follow CornerNet's: a top-left corner is found by top pooling (looking down) and left
pooling (looking right). Gradients flow to the position of each maximum, as with max pooling.

Two forms compute the same running maximum:

- ``"cummax"``: `torch.cummax` (between flips). Used in eager mode: one op, the fastest on CPU.
- ``"log_step"``: the max of the map and its copies shifted by 1, 2, 4, ... cells (padded with
  -inf): ceil(log2(n)) ``pad``/``slice``/``maximum`` steps, all of which ONNX translates, while
  ``cummax`` has no ONNX translation. Used whenever a graph is being exported (torch.export, and
  so the ONNX exporter, which traces through it; `torch.compiler.is_exporting`), or when asked
  with ``method="log_step"``. Under torch.export with a symbolic side the step count covers
  `EXPORT_MAX_SIDE` cells, so one graph serves every size; with a fixed side it is exact. The two
  forms give bit-identical values (a maximum is exact); their gradients differ only at ties
  (``maximum`` splits a tie's gradient, ``cummax`` gives it to one position).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEIGHT, WIDTH = -2, -1
METHODS = ("auto", "cummax", "log_step")
# Longest side (in output-map cells) a dynamically shaped export pools correctly: the
# exporter's largest image side (8192 px) at the finest stride any model uses (4).
EXPORT_MAX_SIDE = 8192 // 4


def _use_log_step(method: str) -> bool:
    if method not in METHODS:
        raise ValueError(f"corner pooling method: expected one of {METHODS}, got {method!r}")
    if method == "auto":
        return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    return method == "log_step"


def _shift_steps(length: int | torch.SymInt) -> int:
    """How many doubling shifts a running max over ``length`` cells needs."""
    if isinstance(length, int):
        return math.ceil(math.log2(length)) if length > 1 else 0
    return math.ceil(math.log2(EXPORT_MAX_SIDE))


def _log_step_running_max(input: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """Max over every index <= i (``reverse``: >= i) along ``dim`` (HEIGHT or WIDTH): after
    step k every cell holds the max of the 2**k cells ending (starting) at it."""
    length = input.shape[dim]
    output = input
    for step in range(_shift_steps(length)):
        shift = 2**step
        # F.pad's pairs run from the last dim: (left, right) for WIDTH, then (top, bottom).
        before, after = (0, shift) if reverse else (shift, 0)
        padding = (before, after) if dim == WIDTH else (0, 0, before, after)
        padded = F.pad(output, padding, value=-math.inf)
        shifted = padded.narrow(dim, shift, length) if reverse else padded.narrow(dim, 0, length)
        output = torch.maximum(output, shifted)
    return output


def _running_max(input: torch.Tensor, dim: int, method: str = "auto") -> torch.Tensor:
    """Max over every index <= i along ``dim``."""
    if _use_log_step(method):
        return _log_step_running_max(input, dim, reverse=False)
    return torch.cummax(input, dim=dim).values


def _reverse_running_max(input: torch.Tensor, dim: int, method: str = "auto") -> torch.Tensor:
    """Max over every index >= i along ``dim`` (cummax form: flip -> cummax -> flip)."""
    if _use_log_step(method):
        return _log_step_running_max(input, dim, reverse=True)
    return torch.flip(torch.cummax(torch.flip(input, [dim]), dim=dim).values, [dim])


def _check(input: torch.Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"corner pooling expects B x C x H x W, got shape {tuple(input.shape)}")


def top_pool(input: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels below it."""
    _check(input)
    return _reverse_running_max(input, HEIGHT, method)


def bottom_pool(input: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels above it."""
    _check(input)
    return _running_max(input, HEIGHT, method)


def left_pool(input: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels to its right."""
    _check(input)
    return _reverse_running_max(input, WIDTH, method)


def right_pool(input: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels to its left."""
    _check(input)
    return _running_max(input, WIDTH, method)


def center_pool(
    vertical: torch.Tensor, horizontal: torch.Tensor | None = None, method: str = "auto"
) -> torch.Tensor:
    """B x C x H x W (both) -> same shape: the column max of ``vertical`` plus the row max of
    ``horizontal``, composed as the original does (top of bottom, left of right)."""
    horizontal = vertical if horizontal is None else horizontal
    if vertical.shape != horizontal.shape:
        raise ValueError(
            f"center_pool: vertical {tuple(vertical.shape)} and horizontal "
            f"{tuple(horizontal.shape)} must have the same shape"
        )
    return top_pool(bottom_pool(vertical, method), method) + left_pool(
        right_pool(horizontal, method), method
    )


# Slow references: explicit slices, one output row or column at a time. For tests only.


def top_pool_reference(input: torch.Tensor) -> torch.Tensor:
    height = input.shape[HEIGHT]
    return torch.stack([input[..., y:, :].amax(dim=HEIGHT) for y in range(height)], dim=HEIGHT)


def bottom_pool_reference(input: torch.Tensor) -> torch.Tensor:
    height = input.shape[HEIGHT]
    return torch.stack([input[..., : y + 1, :].amax(dim=HEIGHT) for y in range(height)], dim=HEIGHT)


def left_pool_reference(input: torch.Tensor) -> torch.Tensor:
    width = input.shape[WIDTH]
    return torch.stack([input[..., x:].amax(dim=WIDTH) for x in range(width)], dim=WIDTH)


def right_pool_reference(input: torch.Tensor) -> torch.Tensor:
    width = input.shape[WIDTH]
    return torch.stack([input[..., : x + 1].amax(dim=WIDTH) for x in range(width)], dim=WIDTH)


def center_pool_reference(
    vertical: torch.Tensor, horizontal: torch.Tensor | None = None
) -> torch.Tensor:
    horizontal = vertical if horizontal is None else horizontal
    column_max = vertical.amax(dim=HEIGHT, keepdim=True)
    row_max = horizontal.amax(dim=WIDTH, keepdim=True)
    return column_max + row_max


class TopPool(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return top_pool(input)


class BottomPool(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return bottom_pool(input)


class LeftPool(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return left_pool(input)


class RightPool(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return right_pool(input)


class CenterPool(nn.Module):
    def forward(
        self, vertical: torch.Tensor, horizontal: torch.Tensor | None = None
    ) -> torch.Tensor:
        return center_pool(vertical, horizontal)
