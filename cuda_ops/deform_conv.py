"""Modulated deformable convolution (DCNv2, Zhu et al. 2019) with the original CenterNet's
semantics and state-dict keys, computed by torchvision's `deform_conv2d` (CPU and CUDA).

Offsets and mask follow the layout of the DCNv2 extension CenterNet was built with, for
deformable group ``g`` and kernel tap ``t = i * kernel_w + j`` (row-major over the kernel):

- ``offset[:, g * 2K + 2t]`` is the row shift (dy) and ``offset[:, g * 2K + 2t + 1]`` the column
  shift (dx) of that tap, in input pixels; ``K = kernel_h * kernel_w``;
- ``mask[:, g * K + t]`` multiplies the tap's sampled value.

Output pixel ``(y, x)`` reads input channel ``c`` (deformable group ``g = c // (C / groups)``)
of tap ``(i, j)`` at the fractional position

    (y * stride_h - pad_h + i * dilation_h + dy,  x * stride_w - pad_w + j * dilation_w + dx)

by bilinear interpolation, the four neighbours outside the image counting as 0. torchvision's
`deform_conv2d` uses exactly this layout (interleaved (dy, dx) per tap, group-major), so the
offsets pass through unchanged; `modulated_deform_conv2d_reference` computes the formula above
with explicit loops and is the test oracle that pins this down.

The original module (`DCN` in CenterNet's DCNv2) computes offsets and mask from its own input
with one conv, ``conv_offset_mask`` (3 * groups * K outputs, zero-initialised): the first two
thirds of its output are the offsets (the original's ``cat(o1, o2)`` of the first two chunks is
exactly that slice) and the sigmoid of the last third is the mask. A fresh module therefore
computes 0.5 * conv(x) + bias: zero offsets and a mask of sigmoid(0) = 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d  # also registers torch.ops.torchvision.deform_conv2d

IntPair = int | tuple[int, int]


def _output_size(
    input: torch.Tensor, weight: torch.Tensor, stride: IntPair, padding: IntPair, dilation: IntPair
) -> tuple[int, int]:
    """(H_out, W_out) of a convolution of these shapes and arguments."""
    return tuple(
        (size + 2 * pad - dilate * (kernel - 1) - 1) // step + 1
        for size, kernel, step, pad, dilate in zip(
            input.shape[-2:], weight.shape[-2:], _pair(stride), _pair(padding), _pair(dilation),
            strict=True,
        )
    )


def _check_shapes(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    output_size: tuple[int, int],
) -> int:
    """The number of deformable groups, after checking the shapes agree."""
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"expected a 4-d input (B, C, H, W) and weight (O, C, kh, kw), got {tuple(input.shape)}"
            f" and {tuple(weight.shape)}"
        )
    if input.shape[1] % weight.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} channels but the weight reads {weight.shape[1]} per "
            "output channel (expected equal, or a divisor for a grouped conv)"
        )
    taps = weight.shape[2] * weight.shape[3]
    groups, remainder = divmod(offset.shape[1], 2 * taps)
    if remainder or groups < 1 or input.shape[1] % groups:
        raise ValueError(
            f"offset has {offset.shape[1]} channels: expected 2 * groups * {taps} (kernel taps) "
            f"with groups dividing the {input.shape[1]} input channels"
        )
    if mask.shape[1] != groups * taps:
        raise ValueError(f"mask has {mask.shape[1]} channels: expected {groups} * {taps}")
    for name, tensor in (("offset", offset), ("mask", mask)):
        if tuple(tensor.shape[-2:]) != tuple(output_size) or tensor.shape[0] != input.shape[0]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}: expected batch {input.shape[0]} and "
                f"the output's size {tuple(output_size)}"
            )
    return groups


def modulated_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Modulated deformable convolution.

    Args:
        input: B x C x H x W.
        offset: B x (2 * groups * kh * kw) x H_out x W_out, in the DCNv2 layout (module
            docstring): per deformable group and kernel tap, (dy, dx) in input pixels.
        mask: B x (groups * kh * kw) x H_out x W_out, already in [0, 1] (the module applies the
            sigmoid).
        weight: O x C x kh x kw.
        bias: O, or None.

    Returns:
        B x O x H_out x W_out, with H_out = (H + 2 pad_h - dilation_h (kh - 1) - 1) // stride_h + 1.
    """
    _check_shapes(
        input, offset, mask, weight, _output_size(input, weight, stride, padding, dilation)
    )
    # The DCNv2 layout and torchvision's are the same (module docstring): no reordering.
    return deform_conv2d(
        input,
        offset,
        weight,
        bias,
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        mask=mask,
    )


def _bilinear_zero_padded(
    image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Sample ``image`` (C x H x W) at fractional positions ``rows``, ``cols`` (both P) by
    bilinear interpolation, pixels outside the image counting as 0. Returns C x P."""
    height, width = image.shape[-2:]
    top, left = torch.floor(rows), torch.floor(cols)
    sampled = image.new_zeros(image.shape[0], rows.numel())
    for row in (top, top + 1):
        for col in (left, left + 1):
            weight = (1 - (rows - row).abs()) * (1 - (cols - col).abs())
            inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
            values = image[:, row.clamp(0, height - 1).long(), col.clamp(0, width - 1).long()]
            sampled += values * (weight * inside)
    return sampled


def modulated_deform_conv2d_reference(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """The slow, obviously correct version of `modulated_deform_conv2d` (same arguments and
    result): the module docstring's formula, one image, deformable group and kernel tap at a
    time. For tests only."""
    out_h, out_w = _output_size(input, weight, stride, padding, dilation)
    groups = _check_shapes(input, offset, mask, weight, (out_h, out_w))
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dilation_h, dilation_w = _pair(dilation)
    batch, channels = input.shape[:2]
    out_channels, _, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    # The regular grid's top-left tap of every output pixel, in input pixels.
    grid_rows = torch.arange(out_h, dtype=input.dtype, device=input.device) * stride_h - pad_h
    grid_cols = torch.arange(out_w, dtype=input.dtype, device=input.device) * stride_w - pad_w
    base_rows = grid_rows[:, None].expand(out_h, out_w)
    base_cols = grid_cols[None, :].expand(out_h, out_w)
    per_group = channels // groups
    output = input.new_zeros(batch, out_channels, out_h, out_w)
    for b in range(batch):
        for g in range(groups):
            channel_slice = slice(g * per_group, (g + 1) * per_group)
            for i in range(kernel_h):
                for j in range(kernel_w):
                    tap = i * kernel_w + j
                    dy = offset[b, g * 2 * taps + 2 * tap]
                    dx = offset[b, g * 2 * taps + 2 * tap + 1]
                    rows = base_rows + i * dilation_h + dy
                    cols = base_cols + j * dilation_w + dx
                    sampled = _bilinear_zero_padded(
                        input[b, channel_slice], rows.flatten(), cols.flatten()
                    )
                    sampled = sampled * mask[b, g * taps + tap].flatten()
                    tap_weight = weight[:, channel_slice, i, j]  # O x C/groups
                    output[b] += (tap_weight @ sampled).view(out_channels, out_h, out_w)
    if bias is not None:
        output += bias[None, :, None, None]
    return output


def deform_conv2d_flops(
    input_shape,
    weight_shape,
    offset_shape,
    mask_shape,
    bias_shape,
    *args,
    out_shape,
    **kwargs,
) -> int:
    """FLOPs (2 x multiply-accumulates) of ``torch.ops.torchvision.deform_conv2d`` for
    `torch.utils.flop_counter.FlopCounterMode(custom_mapping=FLOP_FORMULAS)`, which does not
    know the op: those of a plain convolution of the same shapes, every output value costing
    (C / groups) * kh * kw multiply-accumulates. Bilinear sampling and masking count 0, as in
    the reference figures (and the offset conv is an ordinary conv, counted on its own)."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


# Formulas for FlopCounterMode's ``custom_mapping``: op packet -> formula over shapes.
FLOP_FORMULAS = {torch.ops.torchvision.deform_conv2d: deform_conv2d_flops}

_offsets_without_grad = False


@contextmanager
def offsets_without_grad() -> Iterator[None]:
    """While active, every `ModulatedDeformConv2d` computes its offsets and mask outside
    autograd, so a graph traced through autograd (torch-pruning's) sees the module reading its
    input once. The offset branch reads the same input a second time; torch-pruning 1.6.1 then
    never finishes grouping the model's channels (see ctprune/pruning/dcn.py). Outputs are
    unchanged; only gradients to ``conv_offset_mask`` are lost, so use it for tracing only."""
    global _offsets_without_grad
    previous = _offsets_without_grad
    _offsets_without_grad = True
    try:
        yield
    finally:
        _offsets_without_grad = previous


class ModulatedDeformConv2d(nn.Module):
    """The original CenterNet's ``DCN``: a modulated deformable convolution whose offsets and
    mask come from ``conv_offset_mask`` applied to the same input.

    Parameters (the original's state-dict keys): ``weight`` (O x C x kh x kw, uniform in
    +-1/sqrt(C kh kw)), ``bias`` (O, zeros), ``conv_offset_mask.weight`` /
    ``conv_offset_mask.bias`` (3 * deformable_groups * kh * kw outputs, zeros).

    forward(input: B x C x H x W) -> B x O x H_out x W_out.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        deformable_groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if in_channels % deformable_groups:
            raise ValueError(
                f"in_channels {in_channels} is not divisible by deformable_groups "
                f"{deformable_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        # Two offsets and one mask logit per deformable group and kernel tap.
        self.conv_offset_mask = nn.Conv2d(
            in_channels,
            3 * deformable_groups * taps,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's initialisation: DCNv2's uniform weight and zero bias, and a zero
        offset/mask conv, so a fresh layer samples the regular grid with mask 0.5."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def offset_and_mask(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, mask) for ``input``: B x 2gK x H_out x W_out and B x gK x H_out x W_out."""
        offset_mask = self.conv_offset_mask(input)
        # The original chunks into thirds and concatenates the first two: the same slice. The
        # slice is of conv_offset_mask's outputs, which are never pruned.
        offset_channels = 2 * offset_mask.shape[1] // 3
        offset = offset_mask[:, :offset_channels]
        mask = torch.sigmoid(offset_mask[:, offset_channels:])
        return offset, mask

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _offsets_without_grad:
            with torch.no_grad():
                offset, mask = self.offset_and_mask(input)
        else:
            offset, mask = self.offset_and_mask(input)
        return modulated_deform_conv2d(
            input, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}"
        )
