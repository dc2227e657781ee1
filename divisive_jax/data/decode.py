"""An image file as the model sees it: modes, bit depths and ranges, one still opaque frame.

Shared by the CSV data layer (`csv_files`) and the image-file source of `explain`
(`image_files`), so a file reads the same wherever it comes from.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from divisive_jax.errors import DataError

_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
GRAY_MODES = ("1", "L", "LA", "La", "I", "F") + _UINT16_MODES  # single-channel PIL modes


def to_model_image(
  im: PIL.Image.Image, image_size: int, channels: int, path: str | None = None
) -> np.ndarray:
  """A PIL image as the model sees it: uint8 (S, S) or (S, S, 3), bilinear resize to S x S
  (aspect ratio not kept).

  8-bit images: PIL's ``convert('L' / 'RGB')`` then bilinear resize. 16-bit integer images
  (modes ``I;16*``, and ``I`` when all values lie in 0..65535) are scaled by value / 65535 and
  float (mode ``F``) images must lie in [0, 1]; both are resized in float and stored as
  round(255 x value), so a 16-bit image holding 257 x an 8-bit image equals that image (such
  images take the 8-bit path). Any other range raises `DataError` (a ValueError) naming
  ``path`` (used in messages only), and so is an animated image or one with transparent pixels
  (`still_and_opaque`)."""
  size, what = (image_size, image_size), path or f"image (mode {im.mode})"
  still_and_opaque(im, what)
  if im.mode in _UINT16_MODES or im.mode in ("I", "F"):
    x = _unit_range(im, what)
    if x.dtype != np.uint8:
      x = np.asarray(PIL.Image.fromarray(x, "F").resize(size, PIL.Image.BILINEAR))
      x = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)  # clip: float rounding only
      return np.repeat(x[..., None], 3, axis=2) if channels == 3 else x
    im = PIL.Image.fromarray(x)  # 8-bit data in a 16-bit file: exactly its 8-bit twin
  im = im.convert("L" if channels == 1 else "RGB")
  return np.asarray(im.resize(size, PIL.Image.BILINEAR))


def still_and_opaque(im: PIL.Image.Image, what: str) -> None:
  """An animated image (which frame is the example?) or one with transparent pixels (the model
  would see the colours hidden under them) raises `DataError`; an opaque alpha channel is
  dropped, losing nothing."""
  try:
    frames = getattr(im, "n_frames", 1)
  except ValueError:  # a closed file: its reader counted the frames (`csv_files.read_image`)
    frames = 1
  if frames > 1:
    raise DataError(
      f"{what} is animated ({frames} frames): which frame is the example is a guess. Fix: save "
      "the frame you mean as a still image"
    )
  if "A" in im.getbands() or "transparency" in im.info:
    alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    if (n := int(np.sum(alpha < 255))) > 0:
      raise DataError(
        f"{what} has {n} transparent pixels of {alpha.size} (alpha < 255): the model would see "
        "the colours hidden under them. Fix: flatten it onto the background you mean (e.g. "
        "PIL's Image.alpha_composite onto a black image)"
      )


def _unit_range(im: PIL.Image.Image, what: str) -> np.ndarray:
  """A high-depth image as float32 in [0, 1], or as uint8 when it holds 8-bit data (x 257)."""
  a = np.asarray(im)
  if a.size == 0:
    return a.astype(np.uint8)
  if im.mode == "F":
    if not np.all((a >= 0) & (a <= 1)):
      finite = a[np.isfinite(a)]
      found = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
      found += " and NaN/inf" if finite.size < a.size else ""
      raise DataError(
        f"{what}: float image (mode F) with values {found} not in [0, 1]: its scale is "
        "unknown. Fix: save it as an 8- or 16-bit image, or as float scaled to [0, 1]"
      )
    return a.astype(np.float32)
  a = a.astype(np.int64)
  if a.min() < 0 or a.max() > 65535:
    raise DataError(
      f"{what}: 32-bit integer image (mode {im.mode}) with values {a.min()}..{a.max()} "
      "outside the 16-bit range 0..65535: its bit depth is unknown. Fix: save it as an 8- or "
      "16-bit image"
    )
  if not np.any(a % 257):
    return (a // 257).astype(np.uint8)
  return (a / 65535).astype(np.float32)
