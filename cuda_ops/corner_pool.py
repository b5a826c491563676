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
"""

from __future__ import annotations

import torch
from torch import nn

HEIGHT, WIDTH = -2, -1


def _running_max(input: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over every index <= i along ``dim``."""
    return torch.cummax(input, dim=dim).values


def _reverse_running_max(input: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over every index >= i along ``dim``: flip -> cummax -> flip."""
    return torch.flip(_running_max(torch.flip(input, [dim]), dim), [dim])


def _check(input: torch.Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"corner pooling expects B x C x H x W, got shape {tuple(input.shape)}")


def top_pool(input: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels below it."""
    _check(input)
    return _reverse_running_max(input, HEIGHT)


def bottom_pool(input: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels above it."""
    _check(input)
    return _running_max(input, HEIGHT)


def left_pool(input: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels to its right."""
    _check(input)
    return _reverse_running_max(input, WIDTH)


def right_pool(input: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> same shape: max over the pixel and all pixels to its left."""
    _check(input)
    return _running_max(input, WIDTH)


def center_pool(vertical: torch.Tensor, horizontal: torch.Tensor | None = None) -> torch.Tensor:
    """B x C x H x W (both) -> same shape: the column max of ``vertical`` plus the row max of
    ``horizontal``, composed as the original does (top of bottom, left of right)."""
    horizontal = vertical if horizontal is None else horizontal
    if vertical.shape != horizontal.shape:
        raise ValueError(
            f"center_pool: vertical {tuple(vertical.shape)} and horizontal "
            f"{tuple(horizontal.shape)} must have the same shape"
        )
    return top_pool(bottom_pool(vertical)) + left_pool(right_pool(horizontal))


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
