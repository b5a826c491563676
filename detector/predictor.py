"""The documented import path of the predictor (README, docs): `Predictor` and the
`Detections` it returns live in `detector.inference.predictor`."""

from .inference.predictor import Detections, Predictor

__all__ = ["Detections", "Predictor"]
