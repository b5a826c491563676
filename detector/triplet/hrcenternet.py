"""HrCenterNet (github lizhe960118/HrCenterNet): the keypoint-triplet CenterNet on an HRNet-W18
or a DLA-34 instead of the hourglass. Both build with the triplet head only
(`detector.models.REQUIRED_HEAD`).

- ``hrcenternet_w18`` (its ``models/HRNet.py``): the HRNet-W18 trunk of `detector.models.hrnet`
  with HrCenterNet's stem (no ReLU between the two stem convs), its four branches upsampled
  bilinearly and concatenated (270 channels), then ``cnvs``: a 3x3 conv + BN + ReLU to 256,
  which the triplet head reads; the output heads' 3x3 convs are as wide as the concatenation
  (270, the original's ``curr_dim``).
- ``hrcenternet_dla34`` (its ``models/DLANet.py``): pose_dla_dcn's DLA-34 trunk and neck
  (`detector.models.dla`), then ``cnvs``: a 3x3 conv + BN + ReLU from the neck's 64 channels to
  256; the output heads' 3x3 convs are 64 wide (``curr_dim``).

Where ctprune differs from the original: the class count, which HRNet.py hard-codes to 4 (its
DLANet.py to 80), is the model config's; DLANet.py's trunk loads ImageNet weights by download
and then keeps their unused 1000-class ``base.fc`` (513,000 parameters), while here the trunk
has no classifier and ``pretrained`` takes a local file, as for ``dla34``. The original's
BatchNorm momentum (0.01 in HRNet.py) is a training setting, not part of the model. At the
original sizes and 80 classes the parameter counts are the original's (HRNet.py:
21,627,788; DLANet.py: 26,952,344 without ``base.fc``).

The original's modules are ``pre`` (stem), HRNet's ``layer1``/``transition*``/``stage*`` or
DLA's ``base``/``dla_up``/``ida_up`` at the top level, ``cnvs``, then the triplet head's
``tl_cnvs``, ``tl_heats``, ... without a stack index; `detector.original` maps them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models import dla, hrnet
from ..models.centernet import CenterNet, HeadFactory
from ..models.hourglass import ConvolutionBlock
from ..models.widths import merge_widths

# The triplet head's input: the originals' cnv_dim.
CNV_WIDTH = 256


def build_hrcenternet_hrnet(
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """HrCenterNet's HRNet-W18 model. ``widths`` takes `detector.models.hrnet`'s keys (its
    ``neck`` here is the width of ``cnvs``, the triplet head's input, default 256); ``head_conv``
    None takes the original's: the concatenation's width (270)."""
    defaults = {**hrnet.default_widths(18), "neck": CNV_WIDTH}
    widths = merge_widths(defaults, widths)
    branches = list(widths["branches"])
    trunk = hrnet.HRNetTrunk(
        widths["stem"], widths["stage1"], tuple(branches), tuple(widths["modules"]),
        widths["blocks"], stem_relu=False,
    )
    if pretrained is not None:
        hrnet.load_imagenet_weights(trunk, pretrained)
    neck = nn.Sequential(
        hrnet.UpsampleConcat(), ConvolutionBlock(3, sum(branches), widths["neck"])
    )
    head_conv = sum(branches) if head_conv is None else head_conv
    return CenterNet(trunk, neck, make_heads(widths["neck"], head_conv))


def build_hrcenternet_dla(
    make_heads: HeadFactory,
    head_conv: int | None = None,
    widths: dict | None = None,
    pretrained: str | Path | None = None,
) -> CenterNet:
    """HrCenterNet's DLA-34 model. ``widths`` may override ``channels`` (the six DLA level
    widths, as for ``dla34``) and ``cnv`` (the width of ``cnvs``, default 256); ``head_conv``
    None takes the original's: the neck's width (``channels[2]``, 64)."""
    widths = merge_widths({**dla.DEFAULT_WIDTHS, "cnv": CNV_WIDTH}, widths)
    channels = list(widths["channels"])
    trunk = dla.DLATrunk(channels)
    if pretrained is not None:
        dla.load_imagenet_weights(trunk, pretrained)
    neck_width = channels[dla.FIRST_LEVEL]
    neck = nn.Sequential(dla.DLANeck(channels), ConvolutionBlock(3, neck_width, widths["cnv"]))
    head_conv = neck_width if head_conv is None else head_conv
    return CenterNet(trunk, neck, make_heads(widths["cnv"], head_conv))
