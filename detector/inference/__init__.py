"""Inference: from a model's raw head outputs to boxes in image pixels.

- `detector.inference.decode`: the one decoder (`ctdet_decode`: 3x3 max-pool peaks and top-K,
  traceable by torch.export and ONNX), each head type's adapter from raw outputs to it, and
  `detections_to_image` (output map -> image pixels).
- `detector.inference.tta`: test-time augmentation as the original: flip merge, multi-scale
  merge, soft-NMS.
- `detector.inference.predictor`: `detect` (a batch of prepared inputs -> detections) and
  `Predictor` (checkpoint + images -> detections with class names).
- `detector.inference.onnx_model`: an exported ``.onnx`` file (with its metadata) as a model
  run by onnxruntime, which the predictor and evaluation take like a checkpoint's model.

Import from the modules. This file imports nothing: the head table (`detector.heads`) reads the
decoders while `predictor` reads checkpoints, which build models from that table, so a package
that re-exported both would import itself in a circle.
"""
