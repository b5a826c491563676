"""Evaluation: COCO AP (and the keypoint-triplet paper's false discovery rates), VOC-style
AP50, precision-recall plots, and the driver that runs a model over a data split and scores it
(`evaluate_model`, configured by `EvaluateConfig`).

Detections are (K, 6) arrays per image: x1, y1, x2, y2 in image pixels, score, 0-based class.
Test-time merging (flip test, multi-scale merge, soft-NMS) is inference: `detector.inference.tta`.
"""

from .coco import (
    coco_evaluate,
    detections_to_coco_results,
    false_discovery_rates,
    faster_coco_eval_available,
    ground_truth_to_coco,
)
from .config import EvaluateConfig
from .curves import plot_pr_curves
from .run import evaluate_model, make_evaluator, predict_source
from .voc import average_precision, box_iou, check_detections, read_ground_truth, voc_ap50

__all__ = [
    "EvaluateConfig",
    "average_precision",
    "box_iou",
    "check_detections",
    "coco_evaluate",
    "detections_to_coco_results",
    "evaluate_model",
    "false_discovery_rates",
    "faster_coco_eval_available",
    "ground_truth_to_coco",
    "make_evaluator",
    "plot_pr_curves",
    "predict_source",
    "read_ground_truth",
    "voc_ap50",
]
