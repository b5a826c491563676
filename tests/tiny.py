"""Tiny models for tests: the real topology at a tiny fraction of the cost."""

from detector import ModelConfig, build_model, input_preset

# Scaled-down widths per backbone family.
TINY_WIDTHS = {
    "res": {"stem": 8, "stages": [8, 16, 16, 32], "neck": [16, 16, 16]},
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
    return build_model(arch, num_classes, head_conv=config.head_conv, widths=config.widths, **kwargs)
