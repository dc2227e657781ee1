"""Saliency alignment of a map A with a human mask M, per example (numpy).

* `proportional_energy` (Zhang, Bieri, Guenther, SDS 2024): ``PE = sum(A [M > 0]) / sum(A)``
  (0 when A is all zero), optionally times ``(|image| - |M|) / |image|`` with ``|M| = #{M > 0}``.
* `topk_iou`: IoU between the top-``p`` fraction of map pixels and the mask ``M > 0.5``.
* `entropy`: Shannon entropy of the non-negative map normalised to sum 1, natural log, in NATS:
  ``-sum p log p`` with ``p = A / sum(A)`` (``0 log 0 = 0``); 0 for a map concentrated on one
  pixel, ``log(H W)`` for a uniform one; NaN for an all-zero map (no distribution). Lower
  entropy = a more focused map (the figure the Divisive Decisions authors' group reports).

A and M have the same shape, (H, W) -> float or (N, H, W) -> (N,); the caller resizes.
"""

from __future__ import annotations

import numpy as np

from divisive_jax.maps import MASK_THRESHOLD


def _checked(saliency_map, mask, what: str) -> tuple[np.ndarray, np.ndarray]:
  """(float64 map, mask) as arrays of one shape, (H, W) or (N, H, W); the map free of NaN."""
  a, m = np.asarray(saliency_map, dtype=np.float64), np.asarray(mask)
  if a.shape != m.shape:
    raise ValueError(
      f"{what}: saliency map shape {a.shape} != mask shape {m.shape}; resize "
      f"one to the other first (e.g. the CAM to image resolution)"
    )
  if a.ndim < 2:
    raise ValueError(f"{what}: expected (H, W) or (N, H, W) maps, got shape {a.shape}")
  if np.isnan(a).any():
    raise ValueError(f"{what}: saliency map contains NaN")
  return a, m


def _scalar_or_array(x: np.ndarray):
  return float(x) if x.ndim == 0 else x


def proportional_energy(saliency_map, mask, weight_by_area: bool = False):
  """Proportional energy ``sum(A * [M > 0]) / sum(A)`` over the last two axes.

  ``saliency_map`` A must be non-negative (e.g. a min-max normalised or ReLU'd CAM) and have
  the same shape as ``mask`` M: (H, W) -> float, (N, H, W) -> (N,) array. 0 where A is all
  zero. With ``weight_by_area`` the value is multiplied by ``(|image| - |M|) / |image|``,
  ``|M| = #{M > 0}``, ``|image| = H * W`` (penalises large masks, Zhang et al.).
  """
  a, m = _checked(saliency_map, mask, "proportional_energy")
  if (a < 0).any():
    raise ValueError(
      "proportional_energy: saliency map has negative values; normalise (min-max) or ReLU it first"
    )
  inside = m > 0
  total = a.sum(axis=(-2, -1))
  num = (a * inside).sum(axis=(-2, -1))
  pe = np.divide(num, total, out=np.zeros_like(total), where=total > 0)
  if weight_by_area:
    n = a.shape[-2] * a.shape[-1]
    pe = pe * (n - inside.sum(axis=(-2, -1))) / n
  return _scalar_or_array(pe)


def top_mask(values: np.ndarray, fraction: float) -> np.ndarray:
  """Boolean mask of the top-``fraction`` pixels over the last two axes, ties included.

  k = max(1, round(fraction * H * W)); every pixel >= the k-th largest value is selected, so
  ties at the cut are all kept (a constant map selects every pixel).
  """
  if not (0.0 < fraction <= 1.0):
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  h, w = values.shape[-2:]
  flat = values.reshape(values.shape[:-2] + (h * w,))
  k = max(1, int(round(fraction * h * w)))
  kth = np.partition(flat, h * w - k, axis=-1)[..., h * w - k]
  return values >= kth[..., None, None]


def topk_iou(saliency_map, mask, p: float = 0.1, mask_threshold: float = MASK_THRESHOLD):
  """IoU of the top-``p`` fraction of saliency pixels with the binarised mask ``M > mask_threshold``.

  ``p`` is a fraction (0.1 = top 10%); k = max(1, round(p * H * W)) pixels, ties at the cut
  included. Maps and masks must have the same shape ((H, W) -> float, (N, H, W) -> (N,));
  the caller resizes. Union is never empty (the top set has >= 1 pixel).
  """
  a, m = _checked(saliency_map, mask, "topk_iou")
  top, gt = top_mask(a, p), m > mask_threshold
  inter = (top & gt).sum(axis=(-2, -1))
  union = (top | gt).sum(axis=(-2, -1))
  return _scalar_or_array(inter / union)


def entropy(saliency_map):
  """Shannon entropy in nats of ``A / sum(A)`` over the last two axes (see module docstring)."""
  a = np.asarray(saliency_map, dtype=np.float64)
  if a.ndim < 2:
    raise ValueError(f"entropy: expected (H, W) or (N, H, W) maps, got shape {a.shape}")
  if np.isnan(a).any() or (a < 0).any():
    raise ValueError("entropy: the map must be non-negative and free of NaN (min-max it first)")
  total = a.sum(axis=(-2, -1), keepdims=True)
  p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)
  logp = np.log(p, out=np.zeros_like(p), where=p > 0)
  h = -(p * logp).sum(axis=(-2, -1))
  h = np.where(total[..., 0, 0] > 0, h, np.nan)
  return _scalar_or_array(h)
