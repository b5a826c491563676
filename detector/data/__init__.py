"""Data: dataset sources (COCO json, Pascal VOC xml, declared in YAML), the frozen synthetic
benchmark, augmentation and the torch Dataset that encodes CenterNet targets."""
