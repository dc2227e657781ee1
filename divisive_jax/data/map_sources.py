"""Maps without annotators (``config.data.map_source``): per-example saliency maps computed from
the TRAINING split's images, in the spirit of "What's Old is New Again" (Webster, Scheirer,
arXiv 2606.13528: PCA "Eigenfaces" and LDA "Fisherfaces" of the raw training images).

The construction (`compute`), on the training images as prepared (uint8 at ``image_size``; RGB
averaged to grey), x_i in [0, 1]^(H*W), mu their mean:

* ``pca``: the top k = min(8, n - 1) principal components V_k of the centred images; the
  map of example i is |V_k^T V_k (x_i - mu)|, the part of its deviation from the mean image that
  the main modes of variation of the training set explain, pixel by pixel;
* ``lda`` (two classes): the Fisherface f: PCA to m = min(n - 2, 50) dimensions, then Fisher's
  discriminant w = (S_w + r I)^-1 (mu_1 - mu_0) there (S_w the within-class scatter, r = 1e-3 of
  its mean eigenvalue), back-projected to pixels; the map of example i is |f * (x_i - mu)|, each
  pixel's contribution to its discriminant score;

then smoothed (a Gaussian of sigma = max(1, H / 32) pixels) and min-max normalised to [0, 255]
per example (a constant map is 0). Only training pixels and labels enter: validation and test
never do, and their maps stay the human ones. Examples of the training split with a human map
keep it; those without one get the computed map (``has_saliency`` 1). The maps are computed on the
first read of such an example and cached in the prepared-data folder under a key hashed from the
training images, labels, the source and the construction's version, so a change of the data
computes them anew. ``config.data.human_map_fraction`` < 1 withholds the human maps of a seeded
share of the training examples first (an annotation budget; at 0 every map is computed).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import numpy as np
from absl import logging

from divisive_jax.data import pipeline
from divisive_jax.errors import DataError
from divisive_jax.maps import minmax

SOURCES = ("human", "pca", "lda")
VERSION = 1  # of the construction: part of the cache key
PCA_COMPONENTS, LDA_DIMS = 8, 50
_TAG = 0x3A9  # seed-sequence tag of the withheld maps


def _grey(images: np.ndarray) -> np.ndarray:
  """(n, H, W, C) uint8 -> (n, H*W) float64 in [0, 1]."""
  return (images.astype(np.float64).mean(axis=-1) / 255.0).reshape(len(images), -1)


def _smooth(maps: np.ndarray) -> np.ndarray:
  """A separable Gaussian blur (sigma = max(1, H / 32)) of (n, H, W) maps, zero-padded edges
  renormalised (no scipy)."""

  def kernel(size):
    sigma = max(1.0, size / 32)
    pos = np.arange(size, dtype=np.float64)
    k = np.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2 * sigma**2))
    return k / k.sum(axis=1, keepdims=True)

  kh, kw = kernel(maps.shape[1]), kernel(maps.shape[2])
  return np.matmul(np.matmul(kh, maps), kw.T)


def _normalise(maps: np.ndarray) -> np.ndarray:
  """Per-map min-max (`maps.minmax`: a constant map becomes 0) to uint8 [0, 255]."""
  return np.round(255 * minmax(maps)).astype(np.uint8)


def _components(centred: np.ndarray, k: int) -> np.ndarray:
  """The top ``k`` principal directions (k, d) of the centred rows (n, d), unit length, from
  the eigenvectors of the smaller of the Gram matrix (n x n) and the scatter matrix (d x d)."""
  n, d = centred.shape
  small = centred @ centred.T if n < d else centred.T @ centred
  values, vectors = np.linalg.eigh(small)
  top = np.argsort(values)[::-1][:k]
  if n >= d:
    return vectors[:, top].T
  v = vectors[:, top].T @ centred
  return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def compute(images: np.ndarray, labels: np.ndarray, source: str) -> np.ndarray:
  """The ``source`` maps (n, H, W) uint8 of the training ``images`` (module docstring)."""
  n, h, w = images.shape[:3]
  x = _grey(images)
  centred = x - x.mean(axis=0)
  if source == "pca":
    v = _components(centred, min(PCA_COMPONENTS, n - 1))
    raw = np.abs((centred @ v.T) @ v)
  else:
    v = _components(centred, min(LDA_DIMS, n - 2))
    z = centred @ v.T
    means = [z[labels == c].mean(axis=0) for c in (0, 1)]
    within = sum((z[labels == c] - means[c]).T @ (z[labels == c] - means[c]) for c in (0, 1))
    ridge = 1e-3 * np.trace(within) / len(within) + 1e-12
    fisher = np.linalg.solve(within + ridge * np.eye(len(within)), means[1] - means[0]) @ v
    raw = np.abs(centred * fisher)
  return _normalise(_smooth(raw.reshape(n, h, w)))


class WithheldMaps(pipeline.Wrapper):
  """``source`` (a training split) without the maps of the examples ``withheld`` (indices of
  examples with a map): they count as without one (``has_saliency`` 0, a zero map)."""

  def __init__(self, source, withheld: np.ndarray):
    super().__init__(source)
    self.has_saliency = np.array(source.has_saliency, np.int32)
    self.has_saliency[withheld] = 0

  def _kept(self, idx, maps: np.ndarray) -> np.ndarray:
    return np.where(self.has_saliency[idx, None, None] > 0, maps, 0).astype(np.uint8)

  def read(self, indices) -> dict[str, Any]:
    idx = np.asarray(indices, np.int64).reshape(-1)
    batch = self._source.read(idx)
    batch["saliency"] = self._kept(idx, batch["saliency"])
    batch["has_saliency"] = self.has_saliency[idx].astype(np.float32)
    return batch

  def read_maps(self, indices) -> np.ndarray:
    idx = np.asarray(indices, np.int64).reshape(-1)
    return self._kept(idx, self._source.read_maps(idx))


class ComputedMaps(pipeline.Wrapper):
  """``source`` (a training split) whose examples without a human map have the ``kind`` maps,
  computed (or read from ``cache_dir``) on the first read: a job that never reads training
  examples (evaluate, explain) never computes them."""

  def __init__(self, source, kind: str, cache_dir: str = ""):
    super().__init__(source)
    self._kind, self._cache_dir, self._maps, self._lock = kind, cache_dir, None, threading.Lock()
    self._computed = np.asarray(source.has_saliency) == 0
    self.has_saliency = np.ones(len(source), np.int32)

  def maps(self) -> np.ndarray:
    """The ``kind`` maps (n, H, W) uint8 of every training example (module docstring)."""
    with self._lock:  # the input thread and the main thread may ask at once
      if self._maps is None:
        self._maps = _cached(self._source, self._kind, self._cache_dir)
      return self._maps

  def _filled(self, idx, human: np.ndarray) -> np.ndarray:
    fill = self._computed[idx]
    return np.where(fill[:, None, None], self.maps()[idx], human) if fill.any() else human

  def read(self, indices) -> dict[str, Any]:
    idx = np.asarray(indices, np.int64).reshape(-1)
    batch = self._source.read(idx)
    batch["saliency"] = self._filled(idx, batch["saliency"])
    batch["has_saliency"] = np.ones(len(idx), np.float32)
    return batch

  def read_maps(self, indices) -> np.ndarray:
    idx = np.asarray(indices, np.int64).reshape(-1)
    return self._filled(idx, self._source.read_maps(idx))


def _cached(train, kind: str, cache_dir: str) -> np.ndarray:
  """`compute` on ``train``'s images and labels, cached in ``cache_dir`` under a key hashed
  from them, the kind and the construction's `VERSION`."""
  images, labels = train.read(np.arange(len(train)))["image"], np.asarray(train.label)
  key = hashlib.sha256(images.tobytes() + labels.astype(np.int64).tobytes())
  key.update(f"{kind} {VERSION} {images.shape}".encode())
  file = os.path.join(cache_dir, f"maps_{kind}_{key.hexdigest()[:16]}.npy") if cache_dir else ""
  if file and os.path.exists(file):
    return np.load(file)
  start = time.time()
  maps = compute(images, labels, kind)
  logging.info(
    "Computed %s maps of %d training images in %.2f s", kind, len(images), time.time() - start
  )
  if file:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp.npy"  # processes of one job may write it at once
    np.save(tmp, maps)
    os.replace(tmp, file)
  return maps


def apply(
  train, source: str, cache_dir: str = "", human_fraction: float = 1.0, seed: int = 0
) -> tuple[Any, dict]:
  """(the training split with ``source``'s maps where it has none, the ``info`` entry).

  ``human_fraction`` < 1 (``config.data.human_map_fraction``) first withholds the maps of all
  but that fraction (rounded) of the examples with one, drawn from ``seed``: an annotation
  budget, or (at 0) computed maps in place of every human one. Nothing is computed here: the
  maps are computed on the first read of an example without one (`ComputedMaps`).
  """
  has = np.flatnonzero(np.asarray(train.has_saliency) > 0)
  withheld = len(has) - int(round(human_fraction * len(has)))
  if withheld:
    rng = np.random.default_rng([int(seed), _TAG])
    train = WithheldMaps(train, np.sort(rng.choice(has, withheld, replace=False)))
  missing = int(np.sum(np.asarray(train.has_saliency) == 0))
  info = {"source": source, "human": len(train) - missing, "withheld": withheld, "computed": 0}
  if source == "human" or not missing:
    return train, info
  labels = np.asarray(train.label)
  if source == "lda" and len(np.unique(labels)) < 2:
    raise DataError(
      "config.data.map_source='lda' needs both classes in the training split; it has only "
      f"class {int(labels[0]) if len(labels) else 'none'}. Fix: --config.data.map_source=pca"
    )
  if len(train) < 3:
    raise DataError(
      f"config.data.map_source={source!r} needs at least 3 training images; this split has "
      f"{len(train)}. Fix: --config.data.map_source=human"
    )
  info["computed"] = missing
  return ComputedMaps(train, source, cache_dir), info
