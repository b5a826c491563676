"""Model size and compute: parameters, fp32 state-dict size and multiply-accumulates."""

from __future__ import annotations

import io

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cuda_ops import FLOP_FORMULAS

MIB = 2**20


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_mib(model: nn.Module) -> float:
    """Size of the serialised state dict in MiB, as `torch.save` writes it (the figure the
    pruning literature quotes as "model size"). Meta-device models are sized from their
    tensors' byte counts alone, which leaves out the file's per-tensor overhead (0.05 MiB for
    res18, 0.2 MiB for res101)."""
    tensors = model.state_dict()
    if any(t.is_meta for t in tensors.values()):
        return sum(t.numel() * t.element_size() for t in tensors.values()) / MIB
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.tell() / MIB


def count_macs(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass at ``input_size = (height, width)``, counted by
    torch.utils.flop_counter (FLOPs / 2). Convolutions, transposed convolutions and matrix
    products are counted; BN, ReLU, additions and pooling count 0, as in the reference
    figures. Deformable convs (torchvision's deform_conv2d, unknown to the counter) count as
    a plain conv of the same shape (`cuda_ops.deform_conv2d_flops`), their offset conv on its
    own. (torch-pruning's counter over-counts transposed convs 4x: see the reference.)"""
    parameter = next(model.parameters())
    images = torch.zeros(batch, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        with counter, torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
