"""Class activation maps of BOTH classes from one `jax.vjp` of the classifier head.

Notation: `A` is the last feature map before global average pooling, shape (N, h, w, C);
`head(A)` gives the logits (N, K) with K = 2 (softmax head) or K = 1 (single-logit head).

One vjp of the head at `A` gives a function `vjp_fn(cotangent) -> dL/dA`; we apply it to the
two class cotangents at once with `jax.vmap`, which yields `g_c = d s_c / dA` for c = 0, 1 where
`s_c` is the class score:

* K = 2: `s_c = z_c` (one-hot cotangent e_c).
* K = 1 (Zhang et al., SDS 2024): the map target is `|z|`, i.e. the gradient is multiplied by
  sign(z); the evidence for class 1 is `+z` and for class 0 is `-z`, so the class-0 map is the
  negated class-1 map (cotangents -1 and +1).

Weights per channel from `g_c` (shape (N, C) after reducing the grid):

* ``kind='cam'`` (CYBORG, Zhou et al.): `w_c = sum_{ij} g_c` which for a GAP + dense head is
  exactly the dense weight column `W[:, c]`, so `CAM_c = sum_k W[k, c] A_k`.
* ``kind='gradcam'`` (Selvaraju et al.): `w_c = mean_{ij} g_c`; for a GAP + dense head
  Grad-CAM = CAM / (h * w) (the unit-test oracle).

No ReLU by default (CYBORG uses none; Grad-CAM's ReLU is `relu=True`).

Maps are compared with human maps after per-sample min-max normalisation to [0, 1] (a constant
map normalises to all zeros) and after bringing both to one grid: `resize='map_to_cam'`
(downsample the human map, CYBORG) or `'cam_to_map'` (upsample the CAM), bilinear.

The loss built on these maps is differentiated again w.r.t. the parameters: second order only
through the head, so it costs almost nothing beyond the shared backbone backward pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

KINDS = ("cam", "gradcam")
RESIZE_MODES = ("map_to_cam", "cam_to_map")
_EPS = 1e-12


def class_cotangents(logits: jax.Array) -> jax.Array:
  """Cotangents (2, N, K) selecting the class-0 and class-1 scores of the head output.

  Built on `zeros_like(logits)` so that inside `shard_map` they carry the logits' varying
  manual axes, as the vjp function requires.
  """
  k = logits.shape[-1]
  if k == 2:
    sel = jnp.eye(2, dtype=logits.dtype)[:, None, :]
  elif k == 1:
    sel = jnp.array([-1.0, 1.0], logits.dtype)[:, None, None]
  else:
    raise ValueError(f"binary CAMs need a head with 1 or 2 outputs, got {k}")
  return jnp.zeros_like(logits)[None] + sel


def maps_from_vjp(
  vjp_fn: Callable, logits: jax.Array, features: jax.Array, kind: str = "cam", relu: bool = False
) -> jax.Array:
  """Both class maps (2, N, h, w) from the head's vjp function at `features`."""
  if kind not in KINDS:
    raise ValueError(f"unknown CAM kind {kind!r}; valid: {', '.join(KINDS)}")
  (grads,) = jax.vmap(vjp_fn)(class_cotangents(logits))  # (2, N, h, w, C)
  reduce = jnp.sum if kind == "cam" else jnp.mean
  weights = reduce(grads, axis=(2, 3))  # (2, N, C)
  maps = jnp.einsum("cnk,nhwk->cnhw", weights, features)
  return jax.nn.relu(maps) if relu else maps


def class_maps(
  head_fn: Callable, features: jax.Array, kind: str = "cam", relu: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Logits and both class maps from ONE vjp of `head_fn` at `features`."""
  logits, vjp_fn = jax.vjp(head_fn, features)
  return logits, maps_from_vjp(vjp_fn, logits, features, kind, relu)


def select(maps: jax.Array, cls: jax.Array) -> jax.Array:
  """maps (2, N, h, w), cls (N,) in {0, 1} -> (N, h, w) the map of class cls[n] per sample."""
  return jnp.where(cls[:, None, None] == 1, maps[1], maps[0])


def normalize(x: jax.Array) -> jax.Array:
  """Per-sample min-max to [0, 1] over the trailing two axes; a constant map becomes zeros."""
  lo = jnp.min(x, axis=(-2, -1), keepdims=True)
  span = jnp.max(x, axis=(-2, -1), keepdims=True) - lo
  ok = span > _EPS
  return jnp.where(ok, (x - lo) / jnp.where(ok, span, 1.0), 0.0)


def resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (N, H, W) maps to (N, *hw) (antialiased when downsampling)."""
  if tuple(x.shape[-2:]) == tuple(hw):
    return x
  return jax.image.resize(x, x.shape[:-2] + tuple(hw), method="bilinear", antialias=True)


def to_common_grid(cams: jax.Array, human: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """Bring raw CAMs (..., h, w) and human maps (N, H, W) to one grid; both min-max normalised.

  `cams` may carry leading axes (e.g. (2, N, h, w)); the human map is shared across them.
  """
  if mode == "map_to_cam":
    return normalize(cams), normalize(resize(human, cams.shape[-2:]))
  if mode == "cam_to_map":
    lead = cams.shape[:-2]
    flat = cams.reshape((-1,) + cams.shape[-2:])
    up = resize(flat, human.shape[-2:]).reshape(lead + human.shape[-2:])
    return normalize(up), normalize(human)
  raise ValueError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
