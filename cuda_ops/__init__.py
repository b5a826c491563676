"""Custom operators for CenterNet variants: modulated deformable convolution, corner and center
pooling. Each comes as a function plus a thin module, with a slow reference implementation that
runs on CPU as its test oracle. Importing this package never fails and never compiles anything:
the deformable convolution runs on torchvision's `deform_conv2d` (CPU and CUDA), the poolings
on `torch.cummax`.
"""

from .corner_pool import (
    BottomPool,
    CenterPool,
    LeftPool,
    RightPool,
    TopPool,
    bottom_pool,
    center_pool,
    left_pool,
    right_pool,
    top_pool,
)
from .deform_conv import (
    FLOP_FORMULAS,
    ModulatedDeformConv2d,
    deform_conv2d_flops,
    modulated_deform_conv2d,
    modulated_deform_conv2d_reference,
    offsets_without_grad,
)

__all__ = [
    "FLOP_FORMULAS",
    "BottomPool",
    "CenterPool",
    "LeftPool",
    "ModulatedDeformConv2d",
    "RightPool",
    "TopPool",
    "bottom_pool",
    "center_pool",
    "deform_conv2d_flops",
    "left_pool",
    "modulated_deform_conv2d",
    "modulated_deform_conv2d_reference",
    "offsets_without_grad",
    "right_pool",
    "top_pool",
]
