"""A source over image files (the `divisive_jax.data` protocol): what `explain --images` reads.

Each file is read and converted exactly as the CSV data layer converts its images
(`decode.to_model_image`: mode, 16-bit range, resize, one still opaque frame); no human map,
label unknown (stored as 0); ids are the paths relative to the files' common folder.
"""

from __future__ import annotations

import glob as glob_lib
import os
from typing import Any, Sequence

import numpy as np

from divisive_jax.data import pipeline
from divisive_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def read_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """An image file as the data layer stores it: uint8 (S, S, channels)."""
  import PIL.Image

  from divisive_jax.data.decode import to_model_image

  if channels not in (1, 3):
    raise ConfigError(f"config.data.channels={channels}; expected 1 or 3")
  try:
    with PIL.Image.open(path) as im:
      im.load()
      arr = to_model_image(im, int(image_size), channels, path=path)
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise ConfigError(f"cannot read image {path}: {e}") from None
  return arr[..., None] if arr.ndim == 2 else arr


def find_images(pattern: str) -> list[str]:
  """Sorted image files matching ``pattern`` (a glob, or a directory = every image in it)."""
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*")
  paths = sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  images = [p for p in paths if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
  if not images:
    raise ConfigError(
      f"no image files match --images={pattern!r} ({len(paths)} other file(s); image "
      f"extensions: {', '.join(IMAGE_EXTENSIONS)})"
    )
  return images


class ImageFilesSource(pipeline.Source):
  """The source over the image files ``paths`` (see the module docstring)."""

  def __init__(self, paths: Sequence[str], image_size: int, channels: int):
    self.paths = list(paths)
    self.image_size, self.channels = int(image_size), int(channels)
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths])
    self.ids = np.array([os.path.relpath(os.path.abspath(p), base) for p in self.paths])
    n = len(self.paths)
    self.label = np.zeros(n, np.int32)
    self.attack_type = np.full(n, -1, np.int32)
    self.has_saliency = np.zeros(n, np.int32)

  def read(self, indices) -> dict[str, Any]:
    idx = np.asarray(indices, np.int64)
    s, c = self.image_size, self.channels
    images = [read_image(self.paths[i], s, c) for i in idx]
    image = np.stack(images) if images else np.zeros((0, s, s, c), np.uint8)
    return self.batch(idx, image, np.zeros((len(idx), s, s), np.uint8))
