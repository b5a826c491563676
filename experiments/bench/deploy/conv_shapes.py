"""Single convolutions of the shapes a ResNet CenterNet runs at stride 4 and 8, at full width
and at half width (as pruning by 0.5 leaves them), in the three memory layouts PyTorch offers on
CPU: channels-last (NHWC, ctprune's default), contiguous (NCHW) and oneDNN's blocked layout
(`torch.utils.mkldnn`). Half width quarters the MACs; the ratio full / half shows how much of
that a layout turns into time. Results: experiments/bench/deploy/report.md, section 0.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench/deploy/conv_shapes.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils import mkldnn

# (in, out, kernel, map side, stride): head 3x3, plain 3x3, bottleneck 1x1 and strided 1x1
SHAPES = [(256, 64, 3, 128, 1), (64, 64, 3, 128, 1), (64, 64, 1, 128, 1), (256, 512, 1, 64, 2)]
ROUNDS = 30


def median_ms(function, inputs: torch.Tensor) -> float:
    for _ in range(3):
        function(inputs)
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        function(inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def layouts(in_channels: int, out_channels: int, kernel: int, side: int, stride: int) -> dict:
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
    conv = conv.eval()
    images = torch.randn(1, in_channels, side, side)
    nchw = median_ms(conv, images)
    blocked = median_ms(mkldnn.to_mkldnn(conv), images.to_mkldnn())
    nhwc = median_ms(conv.to(memory_format=torch.channels_last),
                     images.contiguous(memory_format=torch.channels_last))
    return {"NHWC": nhwc, "NCHW": nchw, "blocked": blocked}


def main() -> None:
    torch.set_num_threads(2)
    print("| conv (full -> half width) | map | layout | ms full | ms half "
          "| full / half (ideal 4) |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for in_channels, out_channels, kernel, side, stride in SHAPES:
            full = layouts(in_channels, out_channels, kernel, side, stride)
            half = layouts(in_channels // 2, out_channels // 2, kernel, side, stride)
            for layout in full:
                print(f"| {kernel}x{kernel}/{stride} {in_channels}->{out_channels} -> "
                      f"{in_channels // 2}->{out_channels // 2} | {side}x{side} | {layout} | "
                      f"{full[layout]:.2f} | {half[layout]:.2f} | "
                      f"{full[layout] / half[layout]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
