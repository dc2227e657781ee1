"""Map conventions shared by the losses, the evaluators, the post-hoc tool and the figures.

* `minmax`: per-map min-max normalisation to [0, 1] over the last two axes; a constant map (span
  <= 1e-12) becomes all zeros. Written once for numpy and jax.numpy (``xp``): `cams.normalize`
  is ``minmax(x, jnp)``.
* `MASK_THRESHOLD`: a human map H in [0, 1] marks the pixels with H > 0.5 as "inside" wherever
  a binary mask is needed (the alignment metrics, the post-hoc tool, the masked-input control
  and ActDiff's permutation; GradMask and RRR weigh the input gradient by the soft 1 - H).
"""

from __future__ import annotations

import numpy as np

MASK_THRESHOLD = 0.5
EPS = 1e-12


def minmax(x, xp=np):
  """Per-map min-max to [0, 1] over the trailing two axes; a constant map becomes zeros."""
  lo = xp.min(x, axis=(-2, -1), keepdims=True)
  span = xp.max(x, axis=(-2, -1), keepdims=True) - lo
  ok = span > EPS
  return xp.where(ok, (x - lo) / xp.where(ok, span, 1.0), 0.0)
