"""Built-in synthetic data sets: no files, deterministic from ``config.data.seed``.

Each example is drawn from its own generator seeded with ``(seed, split, index)`` (split
0/1/2 = train/val/test) after the split's labels (and, for ``synthetic_iris``, which examples
carry the shortcut mark) are drawn from ``(seed, split)``, so a set is identical across runs
and machines for a given numpy version.

``shortcut`` — the synthetic shortcut benchmark of Viviano et al. (arXiv 1910.00199)
  28 x 28 x 1, values 0/1, 500/128/128 examples, each split balanced, as published
  (``image_size``, ``channels`` and ``num_*`` are ignored; ``seed`` applies). Class 0
  ``one_cross`` has one cross, class 1 ``two_crosses`` two; a cross is a plus sign with arm
  ``d`` in {1, 2} drawn per cross, its centre (row and column) drawn from ``range(d, 28 - d)``.
  Our reading of "centres drawn without replacement": centres are drawn by rejection so that
  no two crosses share a centre and, stronger, their bounding boxes keep a one-pixel gap from
  each other and from both distractor positions — crosses never touch, so each cross is one
  connected component and the distractor block is always intact. The 2 x 3 distractor block
  sits at rows 23-24, columns 3-5 for class 0 and 22-24 for class 1. Train has the distractor
  aligned with the label; val and test are generated the same way and then mirrored
  left-right (image and map), which moves the distractor to the other class's columns
  (27 - 5 = 22, 27 - 3 = 24) while the crosses stay crosses. The human map is the crosses
  alone (no dilation); every example has one.

``synthetic_iris`` — synthetic iris presentation-attack detection with a train-only shortcut
  Eye-like gray images at ``image_size`` (default 64; stored with one channel, replicated to 3
  on the device when ``config.data.channels`` = 3): skin with low-frequency shading, eyelids
  bounding a bright sclera, an iris annulus with radial fibre texture (random angular
  frequencies, phases, contrast, collarette), a dark pupil, brightness/contrast jitter and
  sensor noise. Classes ``Live`` (0) and ``Spoof`` (1) whatever ``class_names`` says; Spoof is
  split evenly over ``ATTACK_TYPES``, each changing only the iris — the real cue, where the
  human looks: ``printout`` (a rotated halftone dot screen, period 4-6 px, modulating the iris
  by 50-70 %), ``textured_contact`` (printed concentric rings, period 4-6 px, amplitude
  0.12-0.18) and ``synthetic`` (an over-smooth iris: low angular frequencies only, no fine
  fibres or speckle). The human map is the visible iris annulus (pupil and eyelids excluded)
  with soft, ~1 px edges; every example has one.
  The shortcut is a bright flat square (0.9-1.0) flush with a random corner, 3/16 of the side
  (`mark_box`: 12 x 12 px at 64 px, exactly 3 x 3 cells of the quick model's 16 x 16 CAM
  grid), where the map is 0 (by construction >= 5 px from it at 64 px). In train exactly
  ``round(a n)`` of the n Spoof and ``round((1 - a) n)`` of the n Live examples carry it,
  ``a = config.data.shortcut_agreement`` (default ``MARK_AGREEMENT`` = 1: the mark alone
  separates the train classes); in val and test exactly half of each class, so there it says
  nothing about the label. Marks are drawn apart from the images: ``a`` changes only which
  examples carry one (``a`` = 0.5: the same data without the shortcut). Sizes
  ``num_train``/``num_val``/``num_test`` (default 1000/200/200), half Live.
  Design: the real cue is learnable on the quick budget, the mark is easier (CE fits it first)
  and lies outside the human map on cells the CAM grid resolves: what saliency guidance is
  for. Calibrated with plain CE only (``python -m divisive_jax.main
  --config=configs/iris_pad.py:quick,ce --workdir=W --config.seed=S``, S = 0, 1, 2; mean ± std;
  384/128/128 examples, 72 steps, ~30 s on 2 CPU cores): without the shortcut
  (``--config.data.shortcut_agreement=0.5``) train accuracy 0.92, val AUROC 0.965 ± 0.009, test
  0.957 ± 0.018; with it (default) train accuracy 1.00, val AUROC 0.63 ± 0.03, test 0.65 ±
  0.06, mean test P(Spoof) 0.59-0.65 with the mark vs 0.07-0.39 without — CE learns some of
  the iris, but the mark decides. With ``data.seed=1`` (S = 0, 1): 0.91 / 0.91 and 0.53 / 0.58
  (val / test). Agreement 0.9 would leave CE at val 0.75 ± 0.03: the 10 % of train examples
  that contradict the mark teach it the iris, hence the default 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from divisive_jax.data import pipeline
from divisive_jax.errors import DataError

BUILTINS = ("shortcut", "synthetic_iris")
SHORTCUT_SIZE = 28
SHORTCUT_DISTRACTOR_ROWS = (23, 25)  # half-open
SHORTCUT_DISTRACTOR_COLS = ((3, 6), (22, 25))  # class 0, class 1; half-open
ATTACK_TYPES = ("printout", "synthetic", "textured_contact")  # sorted, as CSV sets
MARK_AGREEMENT = 1.0  # synthetic_iris: the default of config.data.shortcut_agreement
SHORTCUT_SPLIT_SIZES = (500, 128, 128)
_IRIS_DEFAULT_SIZES = (1000, 200, 200)
_SPLITS = ("train", "val", "test")


class ArraySource(pipeline.Source):
  """In-memory source: uint8 images (n, H, W, C) and maps (n, H, W); every example has a map."""

  def __init__(self, images, maps, label, attack_type, ids):
    self.images, self.maps, self.ids = images, maps, np.asarray(ids)
    self.label = np.asarray(label, np.int32)
    self.attack_type = np.asarray(attack_type, np.int32)
    self.has_saliency = np.ones(len(images), np.int32)
    self.channels = int(images.shape[-1])

  def read(self, indices) -> dict[str, Any]:
    idx = np.asarray(indices, np.int64)
    return self.batch(idx, self.images[idx], self.maps[idx])

  def read_maps(self, indices) -> np.ndarray:
    return self.maps[np.asarray(indices, np.int64)]


# ---------------------------------------------------------------------------- shortcut
def _cross_box(r, c, d, margin):
  return r - d - margin, r + d + margin, c - d - margin, c + d + margin


def _overlaps(a, b):
  return not (a[1] < b[0] or b[1] < a[0] or a[3] < b[2] or b[3] < a[2])


_DISTRACTOR_BOXES = tuple(
  (SHORTCUT_DISTRACTOR_ROWS[0], SHORTCUT_DISTRACTOR_ROWS[1] - 1, c0, c1 - 1)
  for c0, c1 in SHORTCUT_DISTRACTOR_COLS
)


def shortcut_example(rng: np.random.Generator, label: int, flip: bool):
  """One shortcut image and its map, float 0/1 arrays (28, 28)."""
  size = SHORTCUT_SIZE
  image, mask = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
  boxes = []
  while len(boxes) < label + 1:
    d = int(rng.integers(1, 3))
    r, c = rng.integers(d, size - d, size=2)
    # A 1-px gap: grow one box by 1 before testing against the others.
    if any(_overlaps(_cross_box(r, c, d, margin=1), b) for b in boxes + list(_DISTRACTOR_BOXES)):
      continue
    boxes.append(_cross_box(r, c, d, margin=0))
    mask[r - d : r + d + 1, c] = mask[r, c - d : c + d + 1] = 1
  image[:] = mask
  (r0, r1), (c0, c1) = SHORTCUT_DISTRACTOR_ROWS, SHORTCUT_DISTRACTOR_COLS[label]
  image[r0:r1, c0:c1] = 1
  if flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  return image, mask


# ---------------------------------------------------------------------- synthetic iris
def _smoothstep(x):
  """Soft step 0 -> 1 over x in [-1, 1]."""
  x = np.clip((x + 1) / 2, 0, 1)
  return x * x * (3 - 2 * x)


def mark_box(size: int, corner: int) -> tuple[int, int, int]:
  """``(top, left, side)`` of the shortcut mark (3/16 of the side; module docstring) in corner 0-3
  (TL, TR, BL, BR) of a ``size`` image."""
  side = max(3, round(3 * size / 16))
  return (corner // 2) * (size - side), (corner % 2) * (size - side), side


def iris_example(rng: np.random.Generator, size: int, attack: str | None, mark: bool):
  """One synthetic eye image and its iris map, float arrays (size, size) in [0, 1]."""
  px = 2 / size  # one pixel in the [-1, 1] frame
  yy, xx = ((np.mgrid[0:size, 0:size] + 0.5) * px - 1).astype(np.float32)
  cy, cx = rng.uniform(-0.08, 0.08, 2).tolist()  # Python floats keep arrays float32
  r_iris = rng.uniform(0.45, 0.58)
  r_pupil = r_iris * rng.uniform(0.3, 0.5)
  dy, dx = yy - cy, xx - cx
  r, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
  rho = np.clip((r - r_pupil) / (r_iris - r_pupil), 0, 1)  # 0 at pupil, 1 at limbus

  # Skin with low-frequency shading; eyelids (parabolas) bounding the sclera.
  img = rng.uniform(0.35, 0.5) + sum(
    rng.uniform(0, 0.04) * np.cos(f[0] * xx + f[1] * yy + rng.uniform(0, 2 * np.pi))
    for f in rng.uniform(-4, 4, (3, 2)).tolist()
  )
  half_width = rng.uniform(0.85, 1.0)
  lid = np.clip(1 - (dx / half_width) ** 2, 0, None)
  upper = cy - r_iris * rng.uniform(0.75, 1.15) * lid
  lower = cy + r_iris * rng.uniform(0.85, 1.2) * lid
  open_eye = _smoothstep((yy - upper) / px) * _smoothstep((lower - yy) / px)
  img = img + open_eye * (rng.uniform(0.7, 0.85) - img)

  # Iris: radial fibres (mid/high angular frequencies), collarette, fine speckle.
  smooth = attack == "synthetic"
  freqs = (rng.integers(2, 7, 4) if smooth else rng.integers(12, 40, 6)).tolist()
  fibres = (
    sum(np.cos(m * theta + rng.uniform(0, 2 * np.pi) + rng.uniform(-3, 3) * rho) for m in freqs)
    / len(freqs) ** 0.5
  )
  texture = rng.uniform(0.06, 0.1) * fibres
  texture += rng.uniform(0.03, 0.08) * np.exp(-(((rho - rng.uniform(0.25, 0.4)) / 0.08) ** 2))
  if not smooth:
    speckle = rng.standard_normal((size, size), np.float32)
    speckle = (speckle + np.roll(speckle, 1, 0) + np.roll(speckle, 1, 1)) / 3
    texture += rng.uniform(0.02, 0.04) * speckle
  iris = rng.uniform(0.3, 0.45) * (1 - 0.25 * rho) + texture
  if attack == "printout":  # a rotated halftone dot screen, period 4-6 px, deep modulation
    period, angle = rng.uniform(4, 6) * px, rng.uniform(0, np.pi / 2)
    u = math.cos(angle) * xx + math.sin(angle) * yy
    v = -math.sin(angle) * xx + math.cos(angle) * yy
    screen = (np.cos(2 * np.pi * u / period) * np.cos(2 * np.pi * v / period) + 1) / 2
    contrast = rng.uniform(0.5, 0.7)
    iris = iris * (1 - contrast + contrast * screen)
  elif attack == "textured_contact":  # printed concentric rings, period 4-6 px
    period = rng.uniform(4, 6) * px
    iris = iris + rng.uniform(0.12, 0.18) * np.cos(2 * np.pi * r / period + rng.uniform(0, 7))
  iris_mask = _smoothstep((r_iris - r) / px) * open_eye
  img = img + iris_mask * (iris - img)
  img = img + _smoothstep((r_pupil - r) / px) * open_eye * (rng.uniform(0.03, 0.1) - img)
  saliency = iris_mask * _smoothstep((r - r_pupil) / px)

  img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
  img = img + rng.uniform(0.01, 0.03) * rng.standard_normal(img.shape, np.float32)

  # The shortcut: a bright flat square in a random corner, outside the iris. Its draws are made
  # whether or not it is painted, so `mark` changes nothing else.
  top, left, side = mark_box(size, int(rng.integers(0, 4)))
  value = rng.uniform(0.9, 1.0)
  if mark:
    img[top : top + side, left : left + side] = value
  return np.clip(img, 0, 1), saliency


# ------------------------------------------------------------------------------ loading
def _balanced(rng: np.random.Generator, n: int, num_attack_types: int):
  """Half class 0 (attack -1), half class 1 cycling over attack types; shuffled."""
  label = np.arange(n) % 2
  attack = (
    np.where(label == 1, (np.arange(n) // 2) % num_attack_types, -1)
    if num_attack_types
    else np.full(n, -1)
  )
  order = rng.permutation(n)
  return label[order], attack[order]


def _marks(rng: np.random.Generator, label, agreement: float):
  """Which examples carry the corner mark: the exact counts of the module docstring, at random."""
  mark = np.zeros(len(label), bool)
  for c, p in ((0, 1 - agreement), (1, agreement)):
    members = np.flatnonzero(label == c)
    mark[rng.choice(members, round(p * len(members)), replace=False)] = True
  return mark


def load(data_config: Any):
  """Generates a built-in set.

  Returns ``(sources, class_names, attack_types, info)`` with ``sources`` a dict split ->
  `ArraySource`.
  """
  cfg = lambda name, default: getattr(data_config, name, default)
  name, seed = cfg("builtin", "synthetic_iris"), int(cfg("seed", 0))
  if name not in BUILTINS:
    raise DataError(
      f"config.data.builtin={name!r}; use one of {BUILTINS} or set config.data.csv_path."
    )
  if name == "shortcut":
    sizes = SHORTCUT_SPLIT_SIZES
    class_names, attack_types, agreement = ("one_cross", "two_crosses"), (), None
    example = lambda split, rng, label, *_: shortcut_example(rng, label, flip=split > 0)
    description = (
      "built-in shortcut set (Viviano et al.; no data paths given): 28x28 "
      "one vs two crosses, distractor aligned in train, flipped in val/test"
    )
  else:
    sizes = [int(cfg(f"num_{s}", d)) for s, d in zip(_SPLITS, _IRIS_DEFAULT_SIZES)]
    size = int(cfg("image_size", 64))
    class_names, attack_types = ("Live", "Spoof"), ATTACK_TYPES
    agreement = float(cfg("shortcut_agreement", MARK_AGREEMENT))
    if not 0 <= agreement <= 1:
      raise DataError(
        f"config.data.shortcut_agreement={agreement} must be in [0, 1] (0.5: no shortcut)."
      )

    def example(split, rng, label, attack, mark):
      return iris_example(rng, size, ATTACK_TYPES[attack] if attack >= 0 else None, mark)

    description = (
      f"built-in synthetic iris-PAD set (no data paths given): {size} px, "
      f"Live vs Spoof ({', '.join(ATTACK_TYPES)}), corner-mark shortcut with agreement "
      f"{agreement:g} in train, independent of the label in val/test"
    )
  if min(sizes) < 1:
    raise DataError(f"config.data.num_train/num_val/num_test = {sizes}; each must be >= 1.")
  to_uint8 = lambda arrays: np.round(np.stack(arrays) * 255).astype(np.uint8)
  sources = {}
  for i, (split, n) in enumerate(zip(_SPLITS, sizes)):
    rng = np.random.default_rng([seed, i])
    label, attack_type = _balanced(rng, n, len(attack_types))
    mark = np.zeros(n, bool) if agreement is None else _marks(rng, label, (agreement, 0.5)[i > 0])
    images, maps = zip(
      *(
        example(i, np.random.default_rng([seed, i, k]), label[k], attack_type[k], mark[k])
        for k in range(n)
      )
    )
    images = to_uint8(images)[..., None]  # gray; replicated on the device when channels == 3
    ids = np.array([f"{split}/{k:06d}" for k in range(n)])
    sources[split] = ArraySource(images, to_uint8(maps), label, attack_type, ids)
  info = {"description": description, "source": name, "seed": seed, "skipped": [], "handled": []}
  return sources, class_names, attack_types, info
