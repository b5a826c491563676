"""The synthetic benchmark split into two class subsets, for the two-teacher recipe.

    python experiments/distill_study/subsets.py [--data data/shapes] [--out data/shapes_subsets]

Writes ``<out>/first`` (circle, square, triangle) and ``<out>/second`` (diamond, cross, star):
each a data.yaml and COCO jsons that keep every image, but only that subset's categories and
boxes, so a teacher trained on one sees the other classes as background. Category ids are kept,
so each teacher's class names are the student's classes [0, 1, 2] and [3, 4, 5] in order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SUBSETS = {"first": ("circle", "square", "triangle"), "second": ("diamond", "cross", "star")}


def write_subsets(data: Path, out: Path) -> list[Path]:
    """One data.yaml per subset under ``out``; returns their paths."""
    config = yaml.safe_load((data / "data.yaml").read_text())
    written = []
    for subset, names in SUBSETS.items():
        folder = out / subset
        folder.mkdir(parents=True, exist_ok=True)
        declaration = {"format": "coco"}
        for split in ("train", "val"):
            annotations = json.loads((data / config[split]).read_text())
            categories = [c for c in annotations["categories"] if c["name"] in names]
            if len(categories) != len(names):
                raise ValueError(f"{data / config[split]}: expected categories {names}")
            ids = {category["id"] for category in categories}
            annotations["categories"] = categories
            annotations["annotations"] = [
                a for a in annotations["annotations"] if a["category_id"] in ids
            ]
            (folder / f"{split}.json").write_text(json.dumps(annotations))
            declaration[split] = f"{split}.json"
            declaration[f"{split}_images"] = str((data / config[f"{split}_images"]).resolve())
        (folder / "data.yaml").write_text(yaml.safe_dump(declaration, sort_keys=False))
        written.append(folder / "data.yaml")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "shapes_subsets")
    args = parser.parse_args()
    for path in write_subsets(args.data, args.out):
        print(path)


if __name__ == "__main__":
    main()
