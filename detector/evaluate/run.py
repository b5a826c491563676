"""Evaluate a model on a data split: detections, COCO and VOC metrics, validation loss,
results json, per-class table and P-R curves."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..config import ModelConfig
from ..data.dataset import CenterNetDataset, collate, read_image, worker_init_fn
from ..data.records import DetectionSource
from ..files import atomic_write_json, atomic_write_text
from ..heads import LossFn, head_type
from ..inference.decode import detections_to_image
from ..inference.predictor import Predictor, detect
from ..layout import EVAL_METRICS_FILE, EVAL_RESULTS_FILE, PER_CLASS_TABLE, PR_CURVES_FOLDER_NAME
from .coco import coco_evaluate, detections_to_coco_results, ground_truth_to_coco
from .config import EvaluateConfig
from .curves import plot_pr_curves
from .voc import voc_ap50


@torch.no_grad()
def predict_source(
    model: nn.Module,
    source: DetectionSource,
    model_config: ModelConfig,
    config: EvaluateConfig,
    device: torch.device,
    loss_fn: LossFn | None = None,
) -> tuple[dict[int, np.ndarray], float | None]:
    """Detections (image id -> (K, 6) in image pixels) for every image of ``source``, and the
    mean validation loss when it can be computed (single scale, fixed resolution). Targets,
    loss and decoder are those of the model config's head type; ``loss_fn`` replaces the head's
    loss (training passes its own, `detector.heads.task_loss`). The model is moved to
    ``device``."""
    spec = model_config.input
    head = head_type(model_config.head)
    loss_fn = loss_fn or head.loss
    keep_resolution = (
        spec.keep_resolution if config.keep_resolution is None else config.keep_resolution
    )
    was_training = model.training
    model.to(device).eval()  # where the images go (a checkpoint loads on the CPU)
    detections: dict[int, np.ndarray] = {}
    losses = []
    try:
        if list(config.scales) != [1.0]:
            predictor = Predictor(
                model,
                model_config,
                device=device,
                flip=config.flip,
                scales=tuple(config.scales),
                max_detections=config.max_detections,
                keep_resolution=keep_resolution,
                soft_nms=config.soft_nms,
            )
            for record in tqdm(source.records, desc="evaluate (multi-scale)", leave=False):
                detections[record.image_id] = predictor.predict_one(read_image(record))
            return detections, None
        dataset = CenterNetDataset(source.records, model_config.num_classes, spec, train=False,
                                   keep_resolution=keep_resolution, head=model_config.head)
        loader = DataLoader(
            dataset,
            batch_size=1 if keep_resolution else config.batch_size,
            num_workers=config.workers,
            collate_fn=collate,
            worker_init_fn=worker_init_fn,
        )
        for batch in tqdm(loader, desc="evaluate", leave=False):
            images = batch["image"].to(device)
            if config.flip:
                decoded = detect(
                    model, images, flip=True, max_detections=config.max_detections,
                    head=model_config.head,
                )
            else:
                # One forward pass gives both the validation loss and the detections.
                outputs = model(images)
                targets = {
                    key: value.to(device)
                    for key, value in batch.items()
                    if key not in ("image", "meta")
                }
                losses.append(loss_fn(outputs, targets)[0].item())
                decoded = head.decode(outputs[-1], None, config.max_detections)
            decoded = decoded.cpu().numpy()
            for rows, meta in zip(decoded, batch["meta"], strict=True):
                detections[meta["image_id"]] = detections_to_image(
                    rows, meta["inverse_affine"]
                ).astype(np.float32)
    finally:
        model.train(was_training)
    return detections, (float(np.mean(losses)) if losses else None)


def evaluate_model(
    model: nn.Module,
    source: DetectionSource,
    model_config: ModelConfig,
    config: EvaluateConfig,
    device: torch.device | str = "cpu",
    out_dir: str | Path | None = None,
    write_reports: bool = True,
    loss_fn: LossFn | None = None,
) -> dict:
    """Metrics of ``model`` on ``source``: COCO ``ap``, ``ap50``, ``ap75``, ``aps``, ``apm``,
    ``apl``, VOC-style ``voc_ap50`` (the pruning seed's metric), ``loss`` when available (of
    ``loss_fn``, default the head's loss) and ``per_class_ap``. With ``out_dir`` and
    ``write_reports`` it also writes the COCO results json, a per-class table and one P-R curve
    PNG per class."""
    device = torch.device(device)
    # Under torch.distributed each process predicts its share of the images; rank 0 scores them.
    rank, size = distributed.world()
    shard = dataclasses.replace(source, records=source.records[rank::size])
    detections, loss = predict_source(model, shard, model_config, config, device, loss_fn)
    gathered = distributed.gather_to_main((detections, loss, len(shard.records)))
    if gathered is None:
        return distributed.broadcast_from_main(None)
    detections = {image_id: rows for part, _, _ in gathered for image_id, rows in part.items()}
    weighted = [(part_loss, count) for _, part_loss, count in gathered if part_loss is not None]
    images = sum(count for _, count in weighted)
    loss = sum(value * count for value, count in weighted) / images if weighted else None
    metrics = _score(detections, loss, source, config, out_dir, write_reports)
    return distributed.broadcast_from_main(metrics)


def _score(
    detections: dict[int, np.ndarray],
    loss: float | None,
    source: DetectionSource,
    config: EvaluateConfig,
    out_dir: str | Path | None,
    write_reports: bool,
) -> dict:
    results = detections_to_coco_results(detections, source.category_ids)
    if source.annotation_file is not None and source.annotation_file.suffix == ".json":
        ground_truth = str(source.annotation_file)
    else:
        ground_truth = ground_truth_to_coco(source.records, source.class_names, source.category_ids)
    metrics = coco_evaluate(ground_truth, results)
    voc = voc_ap50(detections, source.records, len(source.class_names))
    metrics["voc_ap50"] = voc["map"]
    if loss is not None:
        metrics["loss"] = loss
    if out_dir is not None and write_reports:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Compact: a COCO val results file holds half a million detections.
        atomic_write_text(out_dir / EVAL_RESULTS_FILE, json.dumps(results, allow_nan=False))
        rows = ["| class | COCO AP | VOC AP50 |", "|---|---|---|"]
        for index, name in enumerate(source.class_names):
            coco_ap = metrics["per_class_ap"].get(name, math.nan)
            rows.append(f"| {name} | {coco_ap:.4f} | {voc['per_class_ap'][index]:.4f} |")
        atomic_write_text(out_dir / PER_CLASS_TABLE, "\n".join(rows) + "\n")
        summary = {k: v for k, v in metrics.items() if k != "per_class_ap"}
        # Strict JSON: a class without ground truth has a NaN AP, written as null.
        atomic_write_json(
            out_dir / EVAL_METRICS_FILE, {**summary, "per_class_ap": metrics["per_class_ap"]}
        )
        if config.pr_curves:
            curves = out_dir / PR_CURVES_FOLDER_NAME
            plot_pr_curves(voc["precision_recall"], source.class_names, curves)
    return metrics


def make_evaluator(
    source: DetectionSource,
    model_config: ModelConfig,
    config: EvaluateConfig,
    device: torch.device | str,
    out_dir: Path,
    loss_fn: LossFn | None = None,
) -> Callable[[nn.Module], dict]:
    """The ``evaluate`` callable for `fit`: flat numeric metrics, reports of the latest
    evaluation in ``out_dir``; the validation loss is ``loss_fn``'s (default: the head's)."""

    def evaluate(model: nn.Module) -> dict:
        metrics = evaluate_model(model, source, model_config, config, device, out_dir,
                                 loss_fn=loss_fn)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    return evaluate
