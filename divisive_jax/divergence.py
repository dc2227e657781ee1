"""The post-hoc tool of Divisive Decisions: which regions separate the two classes (numpy).

``D = norm(CAM_pred) - norm(CAM_other)`` per image (per-map min-max, `maps.minmax`; D > 0:
evidence for the predicted class). `divergence_summary` ranks the regions where |D| is largest
(the top fraction of |D| pixels, split by sign, grouped into connected components) and, where
a human map exists, the share of divergence energy inside it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from divisive_jax.alignment import top_mask
from divisive_jax.maps import minmax


def divergence_map(cam_pred, cam_other) -> np.ndarray:
  """``D = norm(cam_pred) - norm(cam_other)`` in [-1, 1], (H, W) or (N, H, W).

  Positive D: evidence for the predicted class; negative: for the other class. Average D
  over images of one class to get the per-class divergence map.
  """
  p, o = np.asarray(cam_pred, np.float64), np.asarray(cam_other, np.float64)
  if p.shape != o.shape:
    raise ValueError(f"divergence_map: cam_pred shape {p.shape} != cam_other shape {o.shape}")
  return minmax(p) - minmax(o)


_NEIGHBOURS = {
  4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
  8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


def _components(mask: np.ndarray, connectivity: int) -> list[np.ndarray]:
  """Connected components of a 2-D boolean mask: list of (n_i, 2) (row, col) index arrays."""
  h, w = mask.shape
  seen = np.zeros_like(mask, dtype=bool)
  comps = []
  offs = _NEIGHBOURS[connectivity]
  for r0, c0 in zip(*np.nonzero(mask)):
    if seen[r0, c0]:
      continue
    seen[r0, c0] = True
    queue = deque([(int(r0), int(c0))])
    pix = []
    while queue:
      r, c = queue.popleft()
      pix.append((r, c))
      for dr, dc in offs:
        rr, cc = r + dr, c + dc
        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
          seen[rr, cc] = True
          queue.append((rr, cc))
    comps.append(np.asarray(pix, dtype=np.int64))
  return comps


def summarize(
  d: np.ndarray,
  pred_const: bool,
  other_const: bool,
  human,
  top_fraction: float,
  human_threshold: float,
  max_regions: int,
  connectivity: int = 8,
) -> dict[str, Any]:
  h, w = d.shape
  ad = np.abs(d)
  energy = float(ad.sum())
  out: dict[str, Any] = {
    "shape": [h, w],
    "d_min": float(d.min()),
    "d_max": float(d.max()),
    "d_mean": float(d.mean()),
    "d_mean_abs": float(ad.mean()),
    "energy": energy,
    "pred_map_constant": pred_const,
    "other_map_constant": other_const,
  }
  inside = None
  if human is not None:
    inside = human > human_threshold
    out["human_area_fraction"] = float(inside.mean())
    shares = ("human_energy_share", "human_weighted_energy_share", "human_pred_energy_share")
    out.update(dict.fromkeys(shares))  # None when D is all zero
    if energy > 0:
      out["human_energy_share"] = float(ad[inside].sum() / energy)
      out["human_weighted_energy_share"] = float((ad * np.clip(human, 0, None)).sum() / energy)
      pos = np.clip(d, 0, None)
      if pos.sum() > 0:
        out["human_pred_energy_share"] = float(pos[inside].sum() / pos.sum())
  regions = []
  if energy > 0:
    top = top_mask(ad, top_fraction) & (ad > 0)
    for sign, sel in ((1, top & (d > 0)), (-1, top & (d < 0))):
      for pix in _components(sel, connectivity):
        rr, cc = pix[:, 0], pix[:, 1]
        wts = ad[rr, cc]
        e = float(wts.sum())
        peak = int(np.argmax(wts))
        reg = {
          "supports": "predicted" if sign > 0 else "other",
          "area": int(pix.shape[0]),
          "energy": e,
          "energy_share": e / energy,
          "mean_d": float(d[rr, cc].mean()),
          "peak": [int(rr[peak]), int(cc[peak])],
          "peak_d": float(d[rr[peak], cc[peak]]),
          "centroid": [float((rr * wts).sum() / e), float((cc * wts).sum() / e)],
          "bbox": [int(rr.min()), int(cc.min()), int(rr.max()) + 1, int(cc.max()) + 1],
        }
        reg["centroid_frac"] = [(reg["centroid"][0] + 0.5) / h, (reg["centroid"][1] + 0.5) / w]
        if inside is not None:
          reg["human_share"] = float(wts[inside[rr, cc]].sum() / e)
        regions.append(reg)
    regions.sort(key=lambda r: (-r["energy"], r["bbox"]))
    for rank, reg in enumerate(regions):
      reg["rank"] = rank
  out["n_regions"] = len(regions)
  out["top_regions"] = regions[:max_regions]
  return out


def divergence_summary(
  cam_pred,
  cam_other,
  human_map=None,
  top_fraction: float = 0.1,
  human_threshold: float = 0.0,
  max_regions: int = 10,
  connectivity: int = 8,
):
  """Post-hoc divergence tool of Divisive Decisions, per image.

  ``D = norm(cam_pred) - norm(cam_other)`` with per-image min-max normalisation (a constant
  map normalises to all zeros, flagged ``*_map_constant``). The regions where ``|D|`` is
  largest are the features that separate the classes: the top-``top_fraction`` pixels of
  ``|D|`` (ties at the cut included, zero pixels excluded) are split by sign and grouped into
  connected components (``connectivity`` 4 or 8), ranked by their ``|D|`` energy.

  Args:
    cam_pred, cam_other: (H, W) or (N, H, W) CAMs of the predicted and of the other class,
      any range (normalised here).
    human_map: optional human saliency map(s) of the same shape (the caller resizes; e.g.
      bilinear down to the CAM grid); pixels with ``H > human_threshold`` count as inside.
    top_fraction: fraction of pixels forming the candidate regions.
    max_regions: regions kept per image (``n_regions`` counts them all).

  Returns a JSON-able dict per image (a list of them for (N, H, W) input) with
    ``d_min``, ``d_max``, ``d_mean``, ``d_mean_abs``, ``energy`` (= sum |D|);
    if ``human_map``: ``human_area_fraction`` (share expected by chance),
    ``human_energy_share`` (= sum(|D| [H > thr]) / sum |D|), ``human_weighted_energy_share``
    (= sum(|D| H) / sum |D|), ``human_pred_energy_share`` (same as the first for the
    positive part of D only); None when D is all zero;
    ``top_regions``: list of {``rank``, ``supports`` ('predicted' for D > 0, 'other' for
    D < 0), ``area`` (pixels), ``energy``, ``energy_share`` (of the image's total |D|),
    ``mean_d``, ``peak`` [row, col], ``peak_d``, ``centroid`` [row, col] (|D|-weighted, pixel
    units), ``centroid_frac`` (pixel centres as fractions of H and W), ``bbox`` [row0, col0,
    row1, col1) (end exclusive), ``human_share`` (if ``human_map``)}.
  """
  if connectivity not in _NEIGHBOURS:
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
  p, o = np.asarray(cam_pred, dtype=np.float64), np.asarray(cam_other, dtype=np.float64)
  if p.shape != o.shape:
    raise ValueError(f"divergence_summary: cam_pred shape {p.shape} != cam_other shape {o.shape}")
  if p.ndim not in (2, 3):
    raise ValueError(f"divergence_summary: expected (H, W) or (N, H, W), got {p.shape}")
  if np.isnan(p).any() or np.isnan(o).any():
    raise ValueError("divergence_summary: CAMs contain NaN")
  hm = None
  if human_map is not None:
    hm = np.asarray(human_map, dtype=np.float64)
    if hm.shape != p.shape:
      raise ValueError(
        f"divergence_summary: human_map shape {hm.shape} != CAM shape "
        f"{p.shape}; resize the human map to the CAM grid first"
      )
  d = divergence_map(p, o)
  pc, oc = np.ptp(p, axis=(-2, -1)) == 0, np.ptp(o, axis=(-2, -1)) == 0
  args = (top_fraction, human_threshold, max_regions, connectivity)
  if p.ndim == 2:
    return summarize(d, bool(pc), bool(oc), hm, *args)
  return [
    summarize(d[i], bool(pc[i]), bool(oc[i]), None if hm is None else hm[i], *args)
    for i in range(p.shape[0])
  ]
