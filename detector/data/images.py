"""Reading an image file as the (H, W, 3) uint8 BGR array the transforms take, refusing the
damaged ones by name.

cv2 decodes a truncated JPEG without an error (libjpeg only prints "Premature end of JPEG
file" and fills the missing rows with grey), reads a 16-bit PNG as its high bytes (an image
whose values fit in 8 bits comes out black) and keeps or drops alpha and grey channels by the
flags. So the file's bytes are checked here and the pixels converted explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from .records import DataError, ImageRecord

JPEG_START = b"\xff\xd8"
JPEG_START_OF_SCAN = b"\xff\xda"
JPEG_END = b"\xff\xd9"
# Colour images as 3 channels (grey ones converted, alpha dropped) at their own bit depth, with
# EXIF orientation applied as cv2.IMREAD_COLOR does.
READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
UINT16_TO_UINT8 = 65535 / 255
SHOWN = 5
"""Files named one by one in `check_image_files`' errors; the rest are counted."""


class ImageError(DataError):
    """An image file that is missing, damaged or not an image; the message names the file."""


def is_truncated_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG cut short: its last scan has no end-of-image marker after it.
    (A marker byte pair cannot occur inside entropy-coded data, where 0xFF is stuffed as
    0xFF00, so an end marker after the last start-of-scan is the end of the image; bytes that
    some cameras append after it are allowed.)"""
    if not data.startswith(JPEG_START):
        return False
    last_scan = data.rfind(JPEG_START_OF_SCAN)
    return last_scan < 0 or data.rfind(JPEG_END) < last_scan


def to_bgr8(image: np.ndarray, path: str | Path) -> np.ndarray:
    """A decoded image (any depth, 1, 3 or 4 channels) as (H, W, 3) uint8 BGR. 16-bit values
    are scaled from [0, 65535] to [0, 255]."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == np.uint16:
        if image.max() < 256:
            raise ImageError(
                f"{path}: a 16-bit image whose values all lie below 256 (of 65535): it would "
                "read as black. Its pixels probably hold 8-bit values; save it as an 8-bit image"
            )
        image = np.round(image / UINT16_TO_UINT8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ImageError(
            f"{path}: pixels of type {image.dtype}; expected 8- or 16-bit integer images "
            "(convert it to an 8-bit PNG or JPEG)"
        )
    return np.ascontiguousarray(image)


def read_image_file(path: str | Path) -> np.ndarray:
    """The image at ``path`` as (H, W, 3) uint8 BGR.

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageError: a truncated JPEG, a file cv2 cannot decode, or pixels that cannot be
            converted to 8 bits (the message names the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file does not exist") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot read the image file ({error.strerror})") from None
    if is_truncated_jpeg(data):
        raise ImageError(
            f"{path}: a truncated JPEG (the file ends before the image does: an interrupted "
            "download or copy?); replace or remove it"
        )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), READ_FLAGS) if data else None
    if image is None:
        raise ImageError(f"{path}: cannot be read as an image (damaged, or not an image file)")
    return to_bgr8(image, path)


def check_image_files(records: Iterable[ImageRecord]) -> None:
    """Refuse empty files and truncated JPEGs among ``records``' images, all named at once,
    without decoding them: for checks before a run starts (it reads every file once, ~0.01 ms
    per cached 512 px JPEG; decoding is left to training, where `read_image_file` checks again).

    Raises:
        FileNotFoundError: images are missing.
        ImageError: images are empty or truncated (the message names up to 5, with their ids).
    """
    missing, damaged = [], []
    for record in records:
        try:
            data = record.path.read_bytes()
        except FileNotFoundError:
            missing.append(f"image {record.image_id} ({record.path})")
            continue
        if not data or is_truncated_jpeg(data):
            reason = "empty" if not data else "truncated JPEG"
            damaged.append(f"image {record.image_id} ({record.path}: {reason})")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image files do not exist: {', '.join(missing[:SHOWN])}"
        )
    if damaged:
        raise ImageError(
            f"{len(damaged)} image files are damaged: {', '.join(damaged[:SHOWN])}; replace or "
            "remove them"
        )
