"""Saliency controls (``config.data.saliency_control``): the training split's human maps replaced
by a control map, to show that a gain comes from the maps' content (SAGE, arXiv 2511.12744:
inverted maps; Adebayo et al., NeurIPS 2018: sanity checks for saliency).

* ``none``: the human maps.
* ``shuffled``: each training example with a map gets the map of another training example with a
  map (a fixed derangement drawn from the seed): the same maps, the same coverage and the same
  examples with maps (so the same class balance of maps), each on the wrong image.
* ``inverted``: ``1 - H`` (inside and outside swapped), on the examples with a map.
* ``random``: a smooth random blob (Gaussian bumps, thresholded) with the area of the example's
  own mask (pixels with H > `maps.MASK_THRESHOLD`), on the examples with a map.

Only the training split is controlled: validation and test keep the true maps, so alignment is
always measured against what humans marked. Every control map is a pure function of (seed,
example index), whatever the batch, the process or the resume point. Examples without a map keep
none (``has_saliency`` unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from divisive_jax.data import pipeline
from divisive_jax.errors import DataError
from divisive_jax.maps import MASK_THRESHOLD

CONTROLS = ("none", "shuffled", "inverted", "random")
_TAG = 0x5A1  # seed-sequence tag of the controls' random streams


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
  """A permutation of ``range(n)`` (n >= 2) with no fixed point: a random rotation of a random
  order, so each element goes to another."""
  order = rng.permutation(n)
  shift = int(rng.integers(1, n))
  out = np.empty(n, np.int64)
  out[order] = order[(np.arange(n) + shift) % n]
  return out


def random_blob(shape: tuple[int, int], area: int, rng: np.random.Generator) -> np.ndarray:
  """A uint8 map (0 / 255) of ``area`` pixels (ties aside): the top of a sum of 1-4 Gaussian
  bumps of random centres and widths, so the region is smooth and connected like a human mask."""
  h, w = shape
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  field = np.zeros(shape)
  for _ in range(int(rng.integers(1, 5))):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    sigma = rng.uniform(0.1, 0.3) * min(h, w)
    field += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
  field += 1e-9 * rng.random(shape)  # breaks ties, so the area is exact
  out = np.zeros(shape, np.uint8)
  if area > 0:
    out.reshape(-1)[np.argsort(-field, axis=None)[:area]] = 255
  return out


class ControlledMaps(pipeline.Wrapper):
  """``source`` (a training split) whose maps are the ``control``'s (module docstring)."""

  def __init__(self, source, control: str, seed: int):
    if control not in CONTROLS[1:]:
      raise ValueError(f"saliency control {control!r}; valid: {', '.join(CONTROLS)}")
    super().__init__(source)
    self.control, self.seed, self._donor = control, int(seed), None
    if control == "shuffled":
      with_map = np.flatnonzero(np.asarray(self.has_saliency) > 0)
      if len(with_map) < 2:
        raise DataError(
          f"config.data.saliency_control='shuffled' needs at least 2 training examples with a "
          f"map to shuffle; this training split has {len(with_map)}. Fix: give maps "
          "(config.data.map_dir) or use another control"
        )
      rng = np.random.default_rng([self.seed, _TAG])
      self._donor = np.arange(len(source))
      self._donor[with_map] = with_map[derangement(len(with_map), rng)]

  def read(self, indices) -> dict[str, Any]:
    idx = np.asarray(indices, np.int64).reshape(-1)
    batch = self._source.read(idx)
    has = batch["has_saliency"] > 0
    if self.control == "shuffled":
      batch["saliency"] = self._source.read_maps(self._donor[idx])
    elif self.control == "inverted":
      batch["saliency"] = np.where(has[:, None, None], 255 - batch["saliency"], 0).astype(np.uint8)
    else:
      maps = batch["saliency"].copy()
      for row, i in enumerate(idx % len(self)):
        if has[row]:
          area = int(np.sum(maps[row] > MASK_THRESHOLD * 255))
          rng = np.random.default_rng([self.seed, _TAG, int(i)])
          maps[row] = random_blob(maps.shape[1:], area, rng)
      batch["saliency"] = maps
    return batch


def apply(train, control: str, seed: int):
  """The training split with ``control``'s maps (itself for ``none``)."""
  return train if control == "none" else ControlledMaps(train, control, seed)
