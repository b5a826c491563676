"""The documented import path of the decoder (README, docs): `ctdet_decode` and
`detections_to_image` live in `detector.inference.decode`."""

from .inference.decode import ctdet_decode, detections_to_image

__all__ = ["ctdet_decode", "detections_to_image"]
