"""Tiny models for tests: the real topology at a tiny fraction of the cost."""

import numpy as np
import torch

from detector import ModelConfig, build_model, input_preset
from detector.heads import HEADS

# Scaled-down widths per backbone family.
TINY_WIDTHS = {
    "res": {"stem": 8, "stages": [8, 16, 16, 32], "neck": [16, 16, 16]},
    "resdcn": {"stem": 8, "stages": [8, 16, 16, 32], "neck": [16, 16, 8]},
    "resunet": {"stem": 8, "stages": [8, 16, 16, 32], "neck": [16, 16, 8]},
    # two hourglass levels (the original has five), still two stacks; two residuals on the
    # level that widens, so the order of its residuals shows in the import parity test
    "hourglass": {"stem": 8, "dims": [8, 8, 16], "modules": [1, 2, 2], "cnv": 8},
    # centernet52 / centernet104: the same hourglass with one / two stacks (triplet head only)
    "centernet": {"stem": 8, "dims": [8, 8, 16], "modules": [1, 2, 2], "cnv": 8},
    "hrnet_w": {"stem": 8, "stage1": 4, "branches": [4, 8, 8, 16], "modules": [1, 1, 1],
                "blocks": 1, "neck": 16},
    "mobilenet_v3_large": {"width_mult": 0.25, "neck": [16, 8, 8]},
    # DLA-34's six level widths, all different as in the original (the neck follows them)
    "dla": {"channels": [4, 8, 12, 16, 20, 24]},
    # HrCenterNet's HRNet and DLA models (triplet head only): the tiny trunks, an 8-wide cnvs
    "hrcenternet_w": {"stem": 8, "stage1": 4, "branches": [4, 8, 8, 16], "modules": [1, 1, 1],
                      "blocks": 1, "neck": 8},
    "hrcenternet_dla": {"channels": [4, 8, 12, 16, 20, 24], "cnv": 8},
    "dlav0_": {"channels": [4, 8, 12, 16, 20, 24]},
    # the original's 1/2/3 shortcut convs; neck widths differ from the stages they add to
    "ttfnet": {"stem": 8, "stages": [8, 16, 16, 32], "neck": [16, 12, 8],
               "shortcut_convs": [1, 2, 3]},
}
TINY_HEAD_CONV = 8
TINY_INPUT = (64, 64)


def tiny_config(arch: str = "res18", num_classes: int = 3) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        num_classes=num_classes,
        head_conv=TINY_HEAD_CONV,
        widths=TINY_WIDTHS[arch.rstrip("0123456789")],
        input=input_preset("imagenet", TINY_INPUT),
    )


def tiny_model(arch: str = "res18", num_classes: int = 3, **kwargs):
    config = tiny_config(arch, num_classes)
    return build_model(
        arch, num_classes, head_conv=config.head_conv, widths=config.widths, **kwargs
    )


class TinyDetectionData(torch.utils.data.Dataset):
    """Random images with 1-3 boxes each, already encoded as training items (no files)."""

    def __init__(self, length: int = 8, size: int = 64, num_classes: int = 3, seed: int = 0,
                 head: str = "centernet"):
        encode = HEADS[head].encode_targets
        generator = np.random.default_rng(seed)
        self.items = []
        output = size // 4
        for _ in range(length):
            count = int(generator.integers(1, 4))
            corners = generator.uniform(0, output - 4, size=(count, 2))
            sides = generator.uniform(2, output / 2, size=(count, 2))
            boxes = np.concatenate([corners, np.minimum(corners + sides, output - 1)], axis=1)
            labels = generator.integers(0, num_classes, size=count)
            targets = encode(boxes, labels, num_classes, (output, output), max_objects=8)
            item = {key: torch.from_numpy(value) for key, value in targets.items()}
            item["image"] = torch.from_numpy(
                generator.standard_normal((3, size, size)).astype(np.float32)
            )
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def child_environment(**extra: str) -> dict:
    """The environment for a test's child Python process: these helpers and the project
    importable ahead of whatever PYTHONPATH the caller had."""
    import os
    from pathlib import Path

    tests = Path(__file__).parent
    paths = [str(tests), str(tests.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def calibration_batch(head: str = "centernet", size: int = 64, num_classes: int = 3) -> dict:
    """One training batch of two tiny items with ``head``'s targets: what the data-driven
    pruning criteria (taylor, hessian) calibrate on in tests."""
    items = TinyDetectionData(length=2, size=size, num_classes=num_classes, seed=4, head=head).items
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
