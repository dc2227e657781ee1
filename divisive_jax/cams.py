"""Class activation maps of BOTH classes from one `jax.vjp` of the classifier head.

Notation: `A` is the last feature map before global average pooling, shape (N, h, w, C);
`head(A)` gives the logits (N, K) with K = 2 (softmax head) or K = 1 (single-logit head).

One vjp of the head at `A` gives a function `vjp_fn(cotangent) -> dL/dA`; we apply it to the
two class cotangents at once with `jax.vmap`, which yields `g_c = d s_c / dA` for c = 0, 1 where
`s_c` is the class score:

* K = 2: `s_c = z_c` (one-hot cotangent e_c).
* K = 1 (Zhang et al., SDS 2024): the map target is `|z|`, i.e. the gradient is multiplied by
  sign(z); the evidence for class 1 is `+z` and for class 0 is `-z` (cotangents -1 and +1), so
  for the kinds linear in `g` (cam, gradcam) the class-0 map is the negated class-1 map.

The kinds are a TABLE, `KINDS`: kind name -> channel-weight function
`weights(grads, features) -> (2, N, C)`, with `grads` the stacked `g_c` (2, N, h, w, C) and
`features` `A` (N, h, w, C); the map is `CAM_c = sum_k w_c[k] A_k` (then an optional ReLU), so a
new kind is one entry in `KINDS` (and its weight function) in this file:

* ``'cam'`` (CYBORG, Zhou et al.): `w_c = sum_{ij} g_c`, which for a GAP + dense head is
  exactly the dense weight column `W[:, c]`, so `CAM_c = sum_k W[k, c] A_k`.
* ``'gradcam'`` (Selvaraju et al.): `w_c = mean_{ij} g_c`; for a GAP + dense head
  Grad-CAM = CAM / (h * w) (the unit-test oracle).
* ``'gradcampp'`` (Grad-CAM++, Chattopadhay et al., WACV 2018, as pytorch-grad-cam's
  GradCAMPlusPlus): `w_c = sum_{ij} alpha_c relu(g_c)` with
  `alpha_c = g_c^2 / (2 g_c^2 + S g_c^3)`, `S = sum_{ij} A` per channel (see `gradcampp_alpha`);
  for a GAP + dense head `w_c[k] = relu(W[k, c]) / (2 + mean_{ij}(A_k) W[k, c])`.

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

from divisive_jax import maps

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


def cam_weights(grads: jax.Array, features: jax.Array) -> jax.Array:
  """CAM: `w = sum_{ij} g` (the dense weight column for a GAP + dense head)."""
  del features
  return jnp.sum(grads, axis=(2, 3))


def gradcam_weights(grads: jax.Array, features: jax.Array) -> jax.Array:
  """Grad-CAM: `w = mean_{ij} g`."""
  del features
  return jnp.mean(grads, axis=(2, 3))


def gradcampp_alpha(grads: jax.Array, features: jax.Array) -> jax.Array:
  """Grad-CAM++ pixel weights `alpha` (2, N, h, w, C) from the FIRST derivative `g` alone.

  The paper scores a class by `Y_c = exp(S_c)` and sets
  `alpha_ij^kc = d2Y / (2 d2Y + sum_ab A_ab^k d3Y)` with the derivatives taken w.r.t. `A_ij^k`.
  With `g = dS_c/dA_ij^k`: `dY = exp(S) g`, `d2Y = exp(S) (g^2 + d2S) = exp(S) g^2` and
  `d3Y = exp(S) g^3` when `S` is linear in each element `A_ij^k` (`d2S = d3S = 0` on the
  diagonal: GAP/any pooling + dense, or a piecewise-linear ReLU head), so the `exp(S)` factors
  cancel: `alpha = g^2 / (2 g^2 + S_k g^3)`, `S_k = sum_ab A_ab^k`. Only `g` from the vjp is
  needed. For `g != 0` this is `1 / (2 + S_k g)`, the form computed here (scale-free, so the
  guard is a fixed epsilon, and no `g^3` underflow); `alpha = 0` where `g == 0` and where
  `|2 + S_k g|` vanishes (possible only for `g < 0` when `A >= 0`, where `relu(g) = 0` anyway).
  For a GAP + dense head `g = W[k, c] / (h w)` is constant over the grid, so
  `alpha_k = 1 / (2 + S_k g_k)`. A K = 1 head uses `g` of the class score `-z` or `+z`.
  """
  s = jnp.sum(features, axis=(1, 2), keepdims=True)  # (N, 1, 1, C), broadcasts over classes
  den = 2.0 + s * grads
  ok = (grads != 0) & (jnp.abs(den) > _EPS)
  return jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)


def gradcampp_weights(grads: jax.Array, features: jax.Array) -> jax.Array:
  """Grad-CAM++: `w = sum_{ij} alpha relu(g)` (the paper's `sum alpha relu(dY)` over `exp(S)`,
  a positive per-sample factor that min-max normalisation removes), >= 0 when `A >= 0`.

  For a GAP + dense head: `w_k = h w alpha_k relu(g_k) = relu(W[k, c]) / (2 + S_k g_k)`.
  """
  return jnp.sum(gradcampp_alpha(grads, features) * jax.nn.relu(grads), axis=(2, 3))


# Kind name -> weights(grads (2, N, h, w, C), features (N, h, w, C)) -> (2, N, C).
KINDS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  "cam": cam_weights,
  "gradcam": gradcam_weights,
  "gradcampp": gradcampp_weights,
}


def maps_from_vjp(
  vjp_fn: Callable, logits: jax.Array, features: jax.Array, kind: str = "cam", relu: bool = False
) -> jax.Array:
  """Both class maps (2, N, h, w) from the head's vjp function at `features`: the grid `A`, or
  a class-token ViT's `(A, cls)` (`models.grid`), whose maps are those of `A`, `cls` held."""
  if kind not in KINDS:
    raise ValueError(f"unknown CAM kind {kind!r}; valid: {', '.join(KINDS)}")
  (grads,) = jax.vmap(vjp_fn)(class_cotangents(logits))  # (2, N, h, w, C)
  if isinstance(features, tuple):
    grads, features = grads[0], features[0]
  weights = KINDS[kind](grads, features)  # (2, N, C)
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
  return maps.minmax(x, jnp)


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
