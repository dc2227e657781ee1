"""Saliency evaluators: alignment of the CAMs with the human maps, and CAM entropy.

`AlignmentEvaluator` (examples with a human map only): per example the raw class map (the
config's CAM kind) of the TRUE class, and separately of the PREDICTED class, is upsampled
bilinearly to the human map's resolution and min-max normalised to [0, 1]; the human mask is
``H > mask_threshold``. Reported as mean, std (ddof=0) and n over examples:
``proportional_energy`` = sum(A [M]) / sum(A) (Zhang et al.),
``proportional_energy_area_weighted`` (times (|image| - |M|) / |image|) and ``topk_iou`` = IoU
of the top-p fraction of CAM pixels with M. Only per-example scalars are kept.

`EntropyEvaluator` (every example): Shannon entropy, in nats, of the true-class and of the
predicted-class map, each min-max normalised on the CAM grid and then normalised to sum 1
(`divisive_jax.alignment.entropy`); the maximum, log(h w), is that of a uniform map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from divisive_jax import alignment
from divisive_jax.maps import MASK_THRESHOLD, minmax

_CLASSES = ("true_class", "predicted_class")


def _stats(x) -> dict[str, Any]:
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(x.mean()), "std": float(x.std()), "n": int(x.size)}


def _class_maps(host, outputs, keep):
  """{true_class: (n, h, w), predicted_class: (n, h, w)} raw maps of the kept rows."""
  maps = np.asarray(outputs["maps"])[keep]
  rows = np.arange(len(maps))
  return {
    "true_class": maps[rows, np.asarray(host["label"])[keep].astype(np.int64)],
    "predicted_class": maps[rows, np.asarray(outputs["pred"])[keep].astype(np.int64)],
  }


class AlignmentEvaluator:
  key = "saliency_alignment"
  host_keys = ("label", "has_saliency", "saliency")
  output_keys = ("maps", "pred")

  def __init__(self, ctx, top_p: float = 0.1, mask_threshold: float = MASK_THRESHOLD):
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be a fraction in (0, 1], got {top_p}")
    self.top_p, self.mask_threshold = float(top_p), float(mask_threshold)
    names = ("proportional_energy", "proportional_energy_area_weighted", "topk_iou")
    self.values = {c: {k: [] for k in names} for c in _CLASSES}

  def update(self, host: dict, outputs: dict) -> None:
    import jax.numpy as jnp

    from divisive_jax import cams

    keep = np.asarray(host["has_saliency"]) > 0
    if not keep.any():
      return
    human = np.asarray(host["saliency"])[keep]  # (n, H, W)
    mask = human > self.mask_threshold
    for name, raw in _class_maps(host, outputs, keep).items():
      up = np.asarray(cams.resize(jnp.asarray(raw, jnp.float32), human.shape[-2:]))
      cam = minmax(np.asarray(up, np.float64))  # (n, H, W) in [0, 1]
      v = self.values[name]
      v["proportional_energy"].extend(np.atleast_1d(alignment.proportional_energy(cam, mask)))
      v["proportional_energy_area_weighted"].extend(
        np.atleast_1d(alignment.proportional_energy(cam, mask, weight_by_area=True))
      )
      v["topk_iou"].extend(
        np.atleast_1d(alignment.topk_iou(cam, mask.astype(np.float32), p=self.top_p))
      )

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {
      "n_with_map": len(self.values["true_class"]["proportional_energy"]),
      "top_p": self.top_p,
      "mask": f"human map > {self.mask_threshold:g}",
      "cam": "raw class map upsampled bilinearly to the human-map resolution, then min-max "
      "normalised to [0, 1] per example",
      "std": "population std (ddof=0) over examples with a human map",
    }
    for name, v in self.values.items():
      out[name] = {k: _stats(x) for k, x in v.items()}
    return out


class EntropyEvaluator:
  key = "cam_entropy"
  host_keys = ("label",)
  output_keys = ("maps", "pred")

  def __init__(self, ctx):
    self.values = {c: [] for c in _CLASSES}
    self.grid = None

  def update(self, host: dict, outputs: dict) -> None:
    keep = np.ones(len(host["label"]), bool)
    for name, raw in _class_maps(host, outputs, keep).items():
      self.grid = list(raw.shape[-2:])
      self.values[name].extend(
        np.atleast_1d(alignment.entropy(minmax(np.asarray(raw, np.float64))))
      )

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {
      "unit": "nats (natural log)",
      "map": "raw class map on the CAM grid, min-max normalised, then normalised to sum 1",
      "grid": self.grid,
      "max_nats": None if self.grid is None else math.log(self.grid[0] * self.grid[1]),
      "std": "population std (ddof=0); all-zero maps (no distribution) are left out",
    }
    for name, v in self.values.items():
      finite = [x for x in v if np.isfinite(x)]
      out[name] = {**_stats(finite), "n_constant_maps": len(v) - len(finite)}
    return out
