"""Packaging: dependency pins, lazy heavy imports, the guarded private torchvision import and the
``model.input: {preset: ...}`` shorthand."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import child_environment

from detector.config import ConfigError, InputSpec, ModelConfig, from_dict, input_preset
from detector.models import mobilenet

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _requirements(name: str, extra: str | None = None) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [r for r in listed if re.match(rf"{re.escape(name)}\b", r)]


def test_pins():
    # onnxruntime below 1.25 cannot run the deformable-conv exports (measured).
    assert _requirements("onnxruntime", "export") == ["onnxruntime>=1.25"]
    assert _requirements("torch-pruning") == ["torch-pruning>=1.6.1,<1.7"]
    # Still dependencies, only imported where used (next test).
    assert _requirements("scikit-learn") and _requirements("pycocotools")


def test_import_loads_neither_scikit_learn_nor_pycocotools():
    code = (
        "import sys, ctprune, detector, ctprune.cli, ctprune.run, detector.evaluate\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'pycocotools'}))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=child_environment(), check=True).stdout
    assert output.strip() == "[]", output


def test_missing_private_torchvision_function_is_named(monkeypatch):
    monkeypatch.setattr(mobilenet, "_mobilenet_v3_conf", None)
    with pytest.raises(ImportError, match=r"torchvision >= 0\.19 .*_mobilenet_v3_conf.*installed"):
        mobilenet.MobileNetV3Trunk()


@pytest.mark.parametrize("name", ["centernet", "imagenet"])
def test_input_preset_shorthand(name):
    config = from_dict(ModelConfig, {"input": {"preset": name}}, "model")
    assert config.input == input_preset(name)


def test_keys_beside_the_preset_override_it():
    data = {"preset": "centernet", "input_size": [384, 256], "pad": 127}
    spec = from_dict(ModelConfig, {"input": data}, "model").input
    assert spec == InputSpec(**{**vars(input_preset("centernet")), "input_size": (384, 256),
                                "pad": 127})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^model\.input\.preset: expected one of centernet, "
                                          r"imagenet, got 'yolo'$"):
        from_dict(ModelConfig, {"input": {"preset": "yolo"}}, "model")
    with pytest.raises(ValueError, match="unknown input preset 'yolo'; known presets: centernet"):
        input_preset("yolo")
