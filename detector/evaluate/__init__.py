"""Evaluation: COCO AP, VOC-style AP50, precision-recall plots, and the original CenterNet's
test-time merging (flip test, multi-scale merge, soft-NMS).

Detections are (K, 6) arrays per image: x1, y1, x2, y2 in image pixels, score, 0-based class.
"""

from .coco import (
    coco_evaluate,
    detections_to_coco_results,
    faster_coco_eval_available,
    ground_truth_to_coco,
)
from .curves import plot_pr_curves
from .merge import flip_merge, merge_multiscale, soft_nms
from .voc import average_precision, box_iou, check_detections, read_ground_truth, voc_ap50

__all__ = [
    "average_precision",
    "box_iou",
    "check_detections",
    "coco_evaluate",
    "detections_to_coco_results",
    "faster_coco_eval_available",
    "flip_merge",
    "ground_truth_to_coco",
    "merge_multiscale",
    "plot_pr_curves",
    "read_ground_truth",
    "soft_nms",
    "voc_ap50",
]
