"""Image decoding: every path of aimkp that opens an image (the readers' checks, a record's
``load_image``, the models' image processors) goes through :func:`open_image` / :func:`to_rgb`,
so an image means the same pixels wherever it is read.

PIL's own ``convert("RGB")`` is wrong for several modes it opens, silently:

- 16-bit grayscale (``I;16``, ``I;16B``, ``I`` from a 16-bit PNG): PIL clips each value to
  0..255 instead of scaling, so an ordinary 16-bit scan came out almost all white. Here the
  values are scaled (``v * 255 / 65535``).
- 32-bit float (``F``): clipped likewise; scaled from [0, 1] (or clipped to 0..255 when the
  values are larger).
- transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent colour): ``convert`` drops
  the alpha channel and shows what the transparent pixels happen to hold (often black); here
  they are composited on white, as a viewer shows them.
- EXIF orientation (phone photos): applied, so the model sees the picture upright.
- animated images (GIF, APNG, WebP): the first frame.

Other modes (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``) convert with PIL (CMYK JPEGs
from Adobe software, stored inverted, are un-inverted by PIL's decoder). ``LAB`` and other
modes PIL cannot turn into RGB are refused with the mode named.

Errors are :class:`~aimkp.errors.DataError` naming the file: missing, a directory, too large
(PIL's decompression-bomb limit, with the pixel count), not an image or cut short.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from aimkp.errors import DataError

if TYPE_CHECKING:  # PIL is imported when an image is opened: reading text never needs it
    from PIL import Image

__all__ = ["open_image", "path_problem", "to_rgb", "unreadable_reason"]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")
_TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")


def _first_frame(im: Image.Image) -> Image.Image:
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    return im


def _scaled_to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit int or float grayscale image as 8-bit ``L``, scaled, not clipped."""
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        top = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0
        a = np.nan_to_num(a, nan=0.0) * (255.0 / top)
    else:  # I;16* and I: 16-bit samples (PIL opens 16-bit PNGs as I;16 or I)
        a = a.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit ``RGB`` image (a new image unless it already was one), decoded
    correctly for every mode PIL opens (see the module docstring)."""
    from PIL import Image, ImageOps

    im = _first_frame(im)
    if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation other than "upright"
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        return _scaled_to_8bit(im).convert("RGB")
    if im.mode in _TRANSPARENT or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:  # LAB and the like: no conversion in PIL
        raise DataError(f"image mode {im.mode} cannot be converted to RGB ({exc})") from None


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """The image file at ``path`` decoded in full as 8-bit RGB (:func:`to_rgb`); DataError
    naming the file when it is missing, a directory, too large, or not a (whole) image."""
    from PIL import Image, UnidentifiedImageError

    reason = path_problem(path)
    if reason is not None:
        raise DataError(f"{reason}: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb(im)
            return rgb.copy() if rgb is im else rgb  # decoded before the file closes
    except Image.DecompressionBombError as exc:
        raise DataError(f"image too large: {path} ({exc})") from None
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """``missing image`` / ``image path is a directory`` / ``... not a file`` (None: a file)."""
    if os.path.isdir(path):
        return "image path is a directory"
    if not os.path.isfile(path):
        return "missing image" if not os.path.lexists(path) else "image path is not a file"
    return None


def unreadable_reason(path: str | os.PathLike[str]) -> str | None:
    """Why the image file at ``path`` cannot be used (None: it decodes in full): ``verify``
    checks the structure (PNG chunk CRCs), :func:`open_image` decodes every pixel, so a file
    cut short after a valid header is caught when the data is read, not when training reaches
    it. The reasons are the ones the readers count: ``missing image``, ``image path is a
    directory``, ``image too large``, ``unreadable image``."""
    from PIL import Image

    problem = path_problem(path)
    if problem is not None:
        return problem
    try:
        with Image.open(path) as im:
            im.verify()
        open_image(path)
    except Image.DecompressionBombError:
        return "image too large"
    except DataError as exc:
        return "image too large" if str(exc).startswith("image too large") else "unreadable image"
    except Exception:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError) means the
        return "unreadable image"  # file is not a usable image; the reason is counted
    return None
