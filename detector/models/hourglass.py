"""large_hourglass: CornerNet's Hourglass-104, the original's most accurate backbone (40.3 COCO AP).

Two stacked hourglasses with intermediate supervision: a stride-4 stem (`pre`), then per stack
a recursive hourglass (`kps`), a 3x3 conv (`cnvs`) and one head per output; between stacks the
stem features and the stack's features are merged, ``relu(inters_(inter) + cnvs_(cnv))``, and
refined by a residual (`inters`). Module names are the original's (``pre``, ``kps.0.up1.0.conv1``,
``cnvs``, ``inters``, ``inters_``, ``cnvs_``), so its checkpoints import by renaming only the
heads: the original's ``hm.{stack}.0.conv`` / ``hm.{stack}.1`` are our
``heads.{stack}.heatmap.0`` / ``heads.{stack}.heatmap.2`` (see `original_key`). At the original
sizes the model has exactly the original's 191,284,008 parameters for 80 classes.

Which stacks' heads are computed: ``head_stacks`` (a constructor argument, an attribute and a
forward argument) is ``"all"`` by default, in train() and eval() alike, so the output structure
never depends on the mode: ``[stack 0 heads, stack 1 heads]``; the loss averages over both (the
original's intermediate supervision) and decoding reads ``outputs[-1]``, the last stack, as the
original's test does. Asked for ``"last"`` (``model.head_stacks = "last"`` for deployment, or
``model(images, head_stacks="last")``), the model skips stack 0's heads (about 29 of the 293
GMACs at 512 x 512) and returns ``[stack 1 heads]``; ``outputs[-1]`` is then the same tensor
values as with ``"all"``. Train and prune with ``"all"``: with ``"last"`` stack 0's heads get
no gradient and are invisible to the pruning trace. The setting is not part of a checkpoint: a
loaded model computes both stacks until told otherwise.

Where ctprune differs from the original: nothing in the numbers. The original's empty
``nn.Sequential`` placeholders (BatchNorm-less convolutions, identity skips, the identity
``max1`` pool) are ``nn.Identity`` here (no parameters either way, so the state dicts match).
Input sides must be multiples of ``4 * 2**levels`` (128 at the original's five levels; its
keep-resolution testing pads with 127 for this reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .centernet import HeadFactory
from .widths import merge_widths

DEFAULT_WIDTHS = {
    "stem": 128,
    "dims": [256, 256, 384, 384, 384, 512],
    "modules": [2, 2, 2, 2, 2, 4],
    "cnv": 256,
}
# The original's heads are 3x3 conv (dims[0] = 256 wide) + ReLU + 1x1; its head_conv option is
# ignored for hourglass.
DEFAULT_HEAD_CONV = 256
NUM_STACKS = 2
# Keep-resolution testing pads input sides to multiples of the trunk's total stride: stride 4,
# halved once per level (the original's pad of 127 for its five levels).
KEEP_RESOLUTION_PAD = 4 * 2 ** (len(DEFAULT_WIDTHS["dims"]) - 1) - 1
HEAD_STACKS = ("all", "last")


class ConvolutionBlock(nn.Module):
    """The original's ``convolution``: k x k conv (+ BN) + ReLU, names conv / bn / relu."""

    def __init__(
        self,
        kernel_size: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        with_bn: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            bias=not with_bn,
        )
        self.bn = nn.BatchNorm2d(out_channels) if with_bn else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    """The original's ``residual``: two 3x3 conv + BN, a 1x1 conv + BN skip when the shape
    changes (identity otherwise), ReLU after the addition."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.skip = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(out + self.skip(x))


def _residuals(in_channels: int, out_channels: int, count: int, stride: int = 1) -> nn.Sequential:
    """``count`` residuals, the first one changing the width (and stride)."""
    layers = [Residual(in_channels, out_channels, stride)]
    layers += [Residual(out_channels, out_channels) for _ in range(count - 1)]
    return nn.Sequential(*layers)


def _residuals_reversed(in_channels: int, out_channels: int, count: int) -> nn.Sequential:
    """``count`` residuals, the last one changing the width (the original's make_layer_revr)."""
    layers = [Residual(in_channels, in_channels) for _ in range(count - 1)]
    layers.append(Residual(in_channels, out_channels))
    return nn.Sequential(*layers)


class HourglassModule(nn.Module):
    """One level of the recursive hourglass (the original's ``kp_module``), at dims[0] wide.

    ``up1`` keeps the resolution; ``low1`` halves it (stride-2 residual: ``max1`` is the
    identity) and widens to dims[1]; ``low2`` is the next level (or, innermost, modules[1]
    residuals); ``low3`` narrows back to dims[0]; ``up2`` doubles the resolution (nearest);
    the two paths are added. Input (B, dims[0], H, W) -> output of the same shape; H and W
    must be multiples of 2**(len(dims) - 1).
    """

    def __init__(self, dims: list[int], modules: list[int]):
        super().__init__()
        current, following = dims[0], dims[1]
        self.up1 = _residuals(current, current, modules[0])
        self.max1 = nn.Identity()
        self.low1 = _residuals(current, following, modules[0], stride=2)
        if len(dims) > 2:
            self.low2 = HourglassModule(dims[1:], modules[1:])
        else:
            self.low2 = _residuals(following, following, modules[1])
        self.low3 = _residuals_reversed(following, current, modules[0])
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up1 = self.up1(x)
        low = self.low3(self.low2(self.low1(self.max1(x))))
        return up1 + self.up2(low)


class HourglassNet(nn.Module):
    """Stacked-hourglass CenterNet (the original's ``exkp`` / ``HourglassNet``).

    forward(images: B x 3 x H x W) returns one dict per computed stack (see the module
    docstring for ``head_stacks``): ``{"heatmap": B x C x H/4 x W/4 logits, "wh": B x 2 x ...,
    "offset": B x 2 x ...}``, plus ``features`` (that stack's ``cnvs`` output, the heads' input)
    with ``return_features=True``.
    """

    def __init__(
        self,
        make_heads: HeadFactory,
        *,
        stem_width: int = 128,
        dims: Sequence[int] = tuple(DEFAULT_WIDTHS["dims"]),
        modules: Sequence[int] = tuple(DEFAULT_WIDTHS["modules"]),
        cnv_width: int = 256,
        head_conv: int = DEFAULT_HEAD_CONV,
        num_stacks: int = NUM_STACKS,
        head_stacks: str = "all",
    ):
        super().__init__()
        _check_head_stacks(head_stacks)
        dims, modules = list(dims), list(modules)
        width = dims[0]
        # Stride 4: a 7x7 stride-2 conv, then a stride-2 residual.
        self.pre = nn.Sequential(
            ConvolutionBlock(7, 3, stem_width, stride=2), Residual(stem_width, width, stride=2)
        )
        self.kps = nn.ModuleList(HourglassModule(dims, modules) for _ in range(num_stacks))
        self.cnvs = nn.ModuleList(ConvolutionBlock(3, width, cnv_width) for _ in range(num_stacks))
        self.inters = nn.ModuleList(Residual(width, width) for _ in range(num_stacks - 1))
        self.inters_ = nn.ModuleList(_conv1x1_bn(width, width) for _ in range(num_stacks - 1))
        self.cnvs_ = nn.ModuleList(_conv1x1_bn(cnv_width, width) for _ in range(num_stacks - 1))
        self.relu = nn.ReLU(inplace=True)
        # One head module per stack, so `output_layers` finds every stack's output convs.
        self.heads = nn.ModuleList(make_heads(cnv_width, head_conv) for _ in range(num_stacks))
        self.head_stacks = head_stacks

    def forward(
        self,
        images: torch.Tensor,
        return_features: bool = False,
        head_stacks: str | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        head_stacks = self.head_stacks if head_stacks is None else head_stacks
        _check_head_stacks(head_stacks)
        last = len(self.kps) - 1
        inter = self.pre(images)
        outputs = []
        for stack in range(last + 1):
            features = self.cnvs[stack](self.kps[stack](inter))
            if head_stacks == "all" or stack == last:
                output = self.heads[stack](features)
                if return_features:
                    output["features"] = features
                outputs.append(output)
            if stack < last:
                merged = self.relu(self.inters_[stack](inter) + self.cnvs_[stack](features))
                inter = self.inters[stack](merged)
        return outputs


def _conv1x1_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
    )


def _check_head_stacks(head_stacks: str) -> None:
    if head_stacks not in HEAD_STACKS:
        raise ValueError(f"head_stacks: expected one of {HEAD_STACKS}, got {head_stacks!r}")


def original_key(key: str) -> str:
    """An original large_hourglass state-dict key -> ours: trunk keys are unchanged, heads
    move from ``{hm,wh,reg}.{stack}.{0.conv,1}.*`` to ``heads.{stack}.{name}.{0,2}.*``."""
    heads = {"hm": "heatmap", "wh": "wh", "reg": "offset"}
    top, _, rest = key.partition(".")
    if top not in heads:
        return key
    stack, _, rest = rest.partition(".")
    # The 3x3 conv sits in a `convolution` (conv / empty bn / relu): ".0.conv.w" -> ".0.w";
    # the final 1x1 conv is element 1 there and element 2 here (after the ReLU).
    if rest.startswith("0.conv."):
        rest = "0." + rest.removeprefix("0.conv.")
    elif rest.startswith("1."):
        rest = "2." + rest.removeprefix("1.")
    return f"heads.{stack}.{heads[top]}.{rest}"


def build_hourglass(
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
    *,
    num_stacks: int = NUM_STACKS,
) -> HourglassNet:
    """Hourglass-104 CenterNet with the original's two stacks (``num_stacks``: CenterNet-52,
    the keypoint-triplet CenterNet's smaller model, is this hourglass with one stack and the
    triplet heads; `detector.triplet.heads`). ``widths`` may override
    ``stem`` (int), ``dims`` (width per hourglass level, outermost first: len(dims) - 1 levels),
    ``modules`` (residuals per level, same length as dims; the last is the innermost block) and
    ``cnv`` (the width each stack's heads read); missing keys take the original's sizes.
    ``head_conv`` None takes the original's 256."""
    if pretrained is not None:
        raise ValueError(
            f"pretrained={str(pretrained)!r}: the hourglass has no ImageNet trunk weights to "
            "load; start from an original checkpoint (ctprune import-original) instead"
        )
    widths = merge_widths(DEFAULT_WIDTHS, widths, free_lengths=("dims", "modules"))
    dims, modules = list(widths["dims"]), list(widths["modules"])
    if len(dims) < 2 or len(modules) != len(dims):
        raise ValueError(
            f"model.widths: dims ({dims}) needs at least 2 entries and modules ({modules}) one "
            "per entry of dims"
        )
    return HourglassNet(
        make_heads,
        stem_width=widths["stem"],
        dims=dims,
        modules=modules,
        cnv_width=widths["cnv"],
        head_conv=DEFAULT_HEAD_CONV if head_conv is None else head_conv,
        num_stacks=num_stacks,
    )
