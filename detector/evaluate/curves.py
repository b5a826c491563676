"""Per-class precision-recall curves as PNG files (matplotlib's Agg renderer, no display).

The input is ``voc_ap50(...)["precision_recall"]``: per class the precision and recall after
each ranked detection and the class's AP.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .voc import average_precision

# Characters kept in file names; anything else (spaces, slashes, non-ASCII) becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
FIGURE_SIZE_INCHES = (5.0, 4.5)
DOTS_PER_INCH = 100


def safe_file_stem(index: int, name: str) -> str:
    """``"<index>_<name>"`` with every run of unsafe characters replaced by "_". The index
    prefix keeps names unique when two class names reduce to the same text."""
    cleaned = _UNSAFE.sub("_", str(name)).strip("._") or "class"
    return f"{index:03d}_{cleaned}"


def plot_pr_curves(
    per_class_precision_recall: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    out_dir: str | Path,
) -> list[Path]:
    """Write one precision-recall PNG per class.

    Args:
        per_class_precision_recall: per class (in class-index order) a mapping with
            "precision" (D,) and "recall" (D,) after each ranked detection, and optionally
            "ap" (computed from the curve when missing) and "num_ground_truth".
        class_names: the name of each class, for titles and file names.
        out_dir: folder for the PNGs; created if missing.

    Returns:
        The paths written, in class order: ``<out_dir>/<index>_<safe name>_pr.png``. Each shows
        the raw curve, its interpolated envelope (the curve VOC AP integrates), and the class
        name and AP in the title. A class without ground truth gets a figure saying so.
    """
    # A bare Figure renders through the Agg canvas without pyplot, so no window opens and the
    # process-wide backend the user may have chosen is left alone.
    from matplotlib.figure import Figure

    if len(per_class_precision_recall) != len(class_names):
        raise ValueError(
            f"plot_pr_curves: {len(per_class_precision_recall)} curves but "
            f"{len(class_names)} class names"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (curve, name) in enumerate(
        zip(per_class_precision_recall, class_names, strict=True)
    ):
        if "precision" not in curve or "recall" not in curve:
            raise ValueError(
                f"plot_pr_curves: curve {index} ({name!r}) needs 'precision' and 'recall' "
                f"arrays, got keys {sorted(curve)}"
            )
        precision = np.asarray(curve["precision"], dtype=np.float64).reshape(-1)
        recall = np.asarray(curve["recall"], dtype=np.float64).reshape(-1)
        if precision.shape != recall.shape:
            raise ValueError(
                f"plot_pr_curves: curve {index} ({name!r}) has {len(precision)} precision "
                f"but {len(recall)} recall values"
            )
        has_ground_truth = not np.isnan(recall).any()
        ap = curve.get("ap")
        if ap is None:
            ap = average_precision(recall, precision) if has_ground_truth else math.nan

        figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DOTS_PER_INCH)
        axes = figure.subplots()
        if has_ground_truth and len(recall):
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            axes.plot(recall, precision, color="tab:blue", linewidth=1, label="precision")
            axes.step(
                np.concatenate(([0.0], recall)),
                np.concatenate(([envelope[0]], envelope)),
                where="pre",
                color="tab:orange",
                linewidth=1.5,
                label="interpolated (area = AP)",
            )
            axes.legend(loc="best")
        elif not has_ground_truth:
            axes.text(0.5, 0.5, "no ground truth", ha="center", va="center")
        else:
            axes.text(0.5, 0.5, "no detections", ha="center", va="center")
        ap_text = "n/a" if math.isnan(ap) else f"{ap:.4f}"
        title = f"{name}: AP = {ap_text}"
        if curve.get("num_ground_truth") is not None:
            title += f"  ({curve['num_ground_truth']} objects)"
        axes.set_title(title)
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_xlim(0.0, 1.0)
        axes.set_ylim(0.0, 1.05)
        axes.grid(True, alpha=0.3)
        path = out_dir / f"{safe_file_stem(index, name)}_pr.png"
        figure.tight_layout()
        figure.savefig(path)
        paths.append(path)
    return paths
