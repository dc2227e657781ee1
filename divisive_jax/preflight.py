"""Checks that a training run can mean something, made before any training step.

Errors (`ConfigError` / `DataError`), each saying why and what to change:
* a global batch that does not split evenly over the devices;
* a CAM loss term on a 1 x 1 CAM grid (e.g. ``image_size=24`` with resnet18): min-max
  normalisation maps every CAM to 0, so every CAM term is exactly 0 and the method silently
  becomes cross-entropy;
* a training split with a single class: the classifier cannot learn anything.
Warnings (a careful user might mean it): a CAM grid smaller than 4 x 4 with CAM terms (coarse
maps), a validation split with a single class (AUROC and thresholds undefined), and a
``best_metric`` of val/auroc then (it cannot rank checkpoints: an error).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from divisive_jax import losses
from divisive_jax.errors import DataError
from divisive_jax.errors import ConfigError

MIN_GOOD_GRID = 4


def check_devices(config) -> None:
  """The global batch must split evenly over the devices of all processes, and so must the
  BatchNorm groups (`sharding.make_mesh`)."""
  import jax

  from divisive_jax import sharding

  batch, d = int(config.batch_size), jax.device_count()
  if batch % d:
    raise ConfigError(
      f"config.batch_size={batch} must be divisible by the number of devices ({d}); e.g. "
      f"--config.batch_size={max(1, batch // d) * d}"
    )
  sharding.group_size(config.model.bn_group, d)


def check_config(config) -> None:
  """Shape-only checks (no data, no computation)."""
  from divisive_jax import state

  cam_terms = [n for n, w in config.loss.weights.items() if w > 0 and n in losses.CAM_TERMS]
  h, w = state.feature_grid(config)
  where = (
    f"config.model.name={config.model.name!r} (stem {config.model.stem!r}) at "
    f"config.data.image_size={config.data.image_size}"
  )
  if h * w == 1:
    smallest = _smallest_size(config)
    lost = ""
    if cam_terms:
      lost = (
        f"every CAM loss term ({', '.join(cam_terms)}) is exactly 0 (the run would silently be "
      )
      lost += "cross-entropy) and "
    raise ConfigError(
      f"{where} gives a 1x1 CAM grid: {lost}no class map can show where the model looks. Fix: "
      f"--config.data.image_size={smallest} or larger (this model's smallest with a 2x2 grid; "
      "224 for the torchvision models, 64 for tiny) or --config.model.stem=small"
    )
  if not cam_terms:
    return
  if min(h, w) < MIN_GOOD_GRID:
    logging.warning(
      f"{where} gives a {h}x{w} CAM grid: the CAM terms ({', '.join(cam_terms)}) compare very "
      "coarse maps with the human maps; consider a larger image_size."
    )


def check_splits(config, splits) -> None:
  names = splits.class_names
  for split in ("train", "val"):
    labels = np.asarray(getattr(splits, split).label)
    present = sorted(set(labels.tolist()))
    if len(present) >= 2:
      continue
    only = names[present[0]] if present else "none"
    if split == "train":
      raise DataError(
        f"the training split has a single class ({only}, {len(labels)} examples): nothing to "
        f"learn. Fix: add training examples of both classes {names} (CSV split 'train')"
      )
    if config.best_metric == "val/auroc":
      raise ConfigError(
        f"the validation split has a single class ({only}): val/auroc is undefined and cannot "
        "choose checkpoints. Fix: add validation examples of both classes or set "
        "--config.best_metric=val/loss"
      )
    logging.warning(
      f"The validation split has a single class ({only}): AUROC, EER and the thresholds chosen "
      "on validation are undefined (NaN)."
    )


def _smallest_size(config) -> int:
  """The smallest image size at which ``config``'s model has a CAM grid of 2 x 2 or more."""
  import copy

  from divisive_jax import state

  lo, hi = int(config.data.image_size), 1024
  while lo + 1 < hi:  # the grid grows with the size: the first size with a 2x2 grid
    mid = (lo + hi) // 2
    c = copy.deepcopy(config)
    c.data.image_size = mid
    lo, hi = (lo, mid) if min(state.feature_grid(c)) >= 2 else (mid, hi)
  return hi
