"""Argument types of the `ctprune` command line: each parses one option's text and checks its
range, so argparse refuses a bad number before any work starts and names the option
(``argument --count: expected an integer >= 1, got -3``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# Every architecture's total stride divides this (32 for ResNet, DLA, HRNet and MobileNetV3;
# hourglass needs 128, which its checkpoint's input spec checks): smaller or other input sides
# cannot map onto the output grid.
MIN_INPUT_MULTIPLE = 32


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse shows it for unparsable text
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def input_side(text: str) -> int:
    """An input side in pixels: a positive multiple of `MIN_INPUT_MULTIPLE`."""
    value = _integer(text)
    if value < 1 or value % MIN_INPUT_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"expected a positive multiple of {MIN_INPUT_MULTIPLE} (the networks' stride), "
            f"got {text}"
        )
    return value


def number_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite number in the interval from ``low`` to ``high`` (open ends as told)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = _number(text)
        above_low = value > low if low_open else value >= low
        below_high = value < high if high_open else value <= high
        if not (above_low and below_high):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


probability = number_in(0.0, 1.0)
