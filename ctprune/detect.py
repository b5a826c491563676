"""`ctprune detect` over files, folders, globs and videos.

Inputs are expanded into files (`detect_inputs`), each file gets an output path that mirrors
its place below the inputs' common folder (`output_paths`: ``a/img.jpg`` and ``b/img.jpg``
become ``OUT/a/img_detections.png`` and ``OUT/b/img_detections.png``), and `detect_files`
draws the detections: images in batches through `Predictor.predict`, videos frame by frame
into an mp4 of the same frame rate and size.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
VIDEO_CODEC = "mp4v"  # writable by every OpenCV build, unlike H.264


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def detect_inputs(inputs: list[str | Path], exclude: Path | None = None) -> list[Path]:
    """The files that ``inputs`` name, in order, each once: a file as given, a folder's images
    and videos (recursively, sorted by path), a glob's matching files (``**`` recursive).
    Files that folders and globs find below ``exclude`` (the output folder) are left out, so a
    second run into an output folder inside the inputs does not detect on its own drawings.

    Raises:
        FileNotFoundError: an input that is no file or folder and matches nothing.
        ValueError: a folder holding no images or videos.
    """
    files: list[Path] = []
    excluded = exclude.resolve() if exclude is not None else None

    def wanted(path: Path) -> bool:
        return excluded is None or not path.resolve().is_relative_to(excluded)

    for text in map(str, inputs):
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(
                item for item in path.rglob("*")
                if item.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES and item.is_file()
                and wanted(item)
            )
            if not found:
                suffixes = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
                raise ValueError(f"{path}: holds no images or videos ({suffixes})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            matches = [Path(match) for match in sorted(glob.glob(text, recursive=True))]
            matches = [match for match in matches if match.is_file() and wanted(match)]
            if not matches:
                raise FileNotFoundError(f"{text}: no such file or folder, and no file matches it")
            files += matches
    unique, seen = [], set()
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def output_paths(files: list[Path], out_dir: Path) -> list[Path]:
    """The output of each input file: its path below the files' common folder, under
    ``out_dir``, named ``<stem>_detections.png`` (``.mp4`` for a video). Names that still clash
    (``a.jpg`` and ``a.png`` in one folder; compared case-insensitively, as on macOS and
    Windows) get a counter: ``a_detections_2.png``."""
    absolute = [path.resolve() for path in files]
    common = Path(os.path.commonpath([path.parent for path in absolute]))
    outputs, taken = [], set()
    for path in absolute:
        relative = path.relative_to(common)
        suffix = ".mp4" if is_video(path) else ".png"
        base = out_dir / relative.parent / f"{relative.stem}_detections"
        target, count = base.with_name(base.name + suffix), 1
        while str(target).lower() in taken:
            count += 1
            target = base.with_name(f"{base.name}_{count}{suffix}")
        taken.add(str(target).lower())
        outputs.append(target)
    return outputs


def write_image(path: Path, image) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write the image")


def _detect_video(predictor, source: Path, target: Path, threshold: float, batch_size: int,
                  progress) -> int:
    """Draw the detections on every frame of ``source`` into ``target`` (mp4, same frame rate
    and size); returns the number of frames."""
    import cv2

    from detector.visualize import draw_detections

    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise OSError(f"{source}: cannot be opened as a video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0  # some containers do not store it
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*VIDEO_CODEC), fps, size)
    frames = 0
    try:
        if not writer.isOpened():
            raise OSError(f"{target}: cannot be written as an {VIDEO_CODEC} video")
        batch = []
        while True:
            ok, frame = capture.read()
            if ok:
                batch.append(frame)
            if batch and (not ok or len(batch) == batch_size):
                for image, result in zip(batch, predictor.predict(batch, threshold), strict=True):
                    writer.write(draw_detections(image, result))
                frames += len(batch)
                progress.update(len(batch))
                batch = []
            if not ok:
                break
    finally:
        capture.release()
        writer.release()
    if frames == 0:
        raise OSError(f"{source}: no frame could be read")
    return frames


def video_frame_count(path: Path) -> int:
    """The frame count the container declares (0 when unknown), for the progress bar."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    finally:
        capture.release()


def detect_files(predictor, inputs: list[str | Path], out_dir: Path, *, threshold: float = 0.3,
                 batch_size: int = 8, show_heatmap: bool = False) -> list[Path]:
    """Draw ``predictor``'s detections (scores >= ``threshold``) for every input (see
    `detect_inputs`) into ``out_dir`` (see `output_paths`), with a progress bar; images go
    through the model ``batch_size`` at a time. With ``show_heatmap`` each image also gets
    ``<stem>_heatmap.png`` (not videos). Returns the written files."""
    from tqdm import tqdm

    from detector.inference.predictor import read_bgr
    from detector.visualize import draw_detections, heatmap_overlay

    files = detect_inputs(inputs, exclude=out_dir)
    targets = output_paths(files, out_dir)
    images = [(path, target) for path, target in zip(files, targets, strict=True)
              if not is_video(path)]
    videos = [(path, target) for path, target in zip(files, targets, strict=True)
              if is_video(path)]
    total = len(images) + sum(video_frame_count(path) for path, _ in videos)
    written = []
    with tqdm(total=total, unit="image", desc="detect") as progress:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = [read_bgr(path) for path, _ in chunk]
            for (_, target), image, result in zip(
                chunk, pixels, predictor.predict(pixels, threshold), strict=True
            ):
                write_image(target, draw_detections(image, result))
                written.append(target)
                if show_heatmap:
                    heatmap = target.with_name(target.name.replace("_detections", "_heatmap", 1))
                    write_image(heatmap, heatmap_overlay(predictor, image))
                    written.append(heatmap)
            progress.update(len(chunk))
        for path, target in videos:
            _detect_video(predictor, path, target, threshold, batch_size, progress)
            written.append(target)
    return written
