"""CAMs of both classes from one vjp, against independent oracles."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from divisive_jax import cams, losses, models


def _model(num_outputs=2):
  cfg = ml_collections.ConfigDict(dict(name="tiny", width=8, stem="small", num_outputs=num_outputs))
  model = models.get_model(cfg)
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  feats = jax.jit(lambda v: model.apply(v, x, train=False, method="features"))(variables)
  head = lambda a: model.apply({"params": variables["params"]}, a, method="head")
  return variables, feats, head


def test_cam_is_dense_weights_times_features():
  variables, a, head = _model()
  logits, maps = cams.class_maps(head, a, "cam")
  kernel = variables["params"]["head"]["kernel"]  # (C, 2)
  expected = jnp.einsum("nhwk,kc->cnhw", a, kernel)
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, head(a), rtol=1e-6)


def test_gradcam_equals_cam_over_grid_size():
  _, a, head = _model()
  _, cam = cams.class_maps(head, a, "cam")
  _, grad_cam = cams.class_maps(head, a, "gradcam")
  h, w = a.shape[1:3]
  np.testing.assert_allclose(grad_cam, cam / (h * w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_vmapped_vjp_equals_per_class_grad(num_outputs):
  _, a, head = _model(num_outputs)
  _, maps = cams.class_maps(head, a, "gradcam")
  for c in (0, 1):
    sign = (1.0 if c == 1 else -1.0) if num_outputs == 1 else 1.0
    idx = 0 if num_outputs == 1 else c
    g = jax.grad(lambda f: sign * jnp.sum(head(f)[:, idx]))(
      a
    )  # per-sample grads (rows independent)
    expected = jnp.einsum("nk,nhwk->nhw", g.mean(axis=(1, 2)), a)
    np.testing.assert_allclose(maps[c], expected, rtol=1e-5, atol=1e-6)


def test_single_logit_false_class_map_is_negated():
  _, a, head = _model(1)
  logits, maps = cams.class_maps(head, a, "cam")
  np.testing.assert_allclose(maps[0], -maps[1], rtol=1e-6)
  # The predicted-class map is the map of |z|: sign(z) times the map of z.
  pred = losses.predicted_class(logits)
  abs_map = jnp.sign(logits[:, 0])[:, None, None] * maps[1]
  np.testing.assert_allclose(cams.select(maps, pred), abs_map, rtol=1e-6)


def test_normalize_range_and_constant_guard():
  x = jnp.stack([jnp.arange(16.0).reshape(4, 4) - 3.0, jnp.full((4, 4), 2.5)])
  out = cams.normalize(x)
  np.testing.assert_allclose(out[0].min(), 0.0)
  np.testing.assert_allclose(out[0].max(), 1.0)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda v: jnp.sum(cams.normalize(v) ** 2))(x)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("mode,grid", [("map_to_cam", (4, 4)), ("cam_to_map", (16, 16))])
def test_common_grid(mode, grid):
  raw = jax.random.normal(jax.random.key(0), (2, 3, 4, 4))
  human = jnp.zeros((3, 16, 16)).at[:, 4:12, 4:12].set(1.0)
  m, h = cams.to_common_grid(raw, human, mode)
  assert m.shape == (2, 3) + grid and h.shape == (3,) + grid
  assert float(h.max()) == pytest.approx(1.0) and float(h.min()) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="map_to_cam"):
    cams.to_common_grid(raw, human, "nearest")


def test_cam_losses_reach_the_backbone():
  cfg = ml_collections.ConfigDict(dict(name="tiny", width=8, stem="small", num_outputs=2))
  model = models.get_model(cfg)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  batch = {
    "label": jnp.array([0, 1, 0, 1]),
    "valid": jnp.ones(4),
    "has_saliency": jnp.ones(4),
    "saliency": jnp.zeros((4, 16, 16)).at[:, 2:9, 3:12].set(1.0),
    "image": x,
  }
  for term in losses.CAM_TERMS:
    cfg_l = losses.LossConfig(weights=((term, 1.0),))

    def loss(params):
      a = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=False,
        method="features",
      )
      logits, maps = cams.class_maps(lambda f: model.apply({"params": params}, f, method="head"), a)
      return losses.combine({"logits": logits, "maps": maps}, batch, cfg_l)[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    backbone = jax.tree.leaves(grads["backbone"])
    assert sum(float(jnp.abs(g).sum()) for g in backbone) > 0, term


# --- The kinds table and Grad-CAM++ ----------------------------------------------------------


def _grads(head, a):
  """Logits and the stacked class gradients g (2, N, h, w, C) from one vjp, as `cams` does."""
  logits, vjp_fn = jax.vjp(head, a)
  (g,) = jax.vmap(vjp_fn)(cams.class_cotangents(logits))
  return logits, g


def _gradcampp_literal(g, a):
  """pytorch-grad-cam's formula in numpy float64: g^2 / (2 g^2 + S g^3), 0 where g == 0."""
  g, a = np.asarray(g, np.float64), np.asarray(a, np.float64)
  s = a.sum(axis=(1, 2), keepdims=True)
  den = 2 * g**2 + s * g**3
  alpha = np.where(g != 0, g**2 / np.where(g != 0, den, 1.0), 0.0)
  return alpha, (alpha * np.maximum(g, 0.0)).sum(axis=(2, 3))


def test_kinds_table():
  assert list(cams.KINDS) == ["cam", "gradcam", "gradcampp"]
  g = jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 6))
  a = jax.random.uniform(jax.random.key(1), (3, 4, 5, 6))
  for kind, weights in cams.KINDS.items():
    assert weights(g, a).shape == (2, 3, 6), kind
  # cam / gradcam are the plain grid sum / mean (the numbers of the former if/else, bit for bit).
  np.testing.assert_array_equal(cams.KINDS["cam"](g, a), jnp.sum(g, axis=(2, 3)))
  np.testing.assert_array_equal(cams.KINDS["gradcam"](g, a), jnp.mean(g, axis=(2, 3)))


def test_unknown_kind_lists_the_valid_ones():
  _, a, head = _model()
  with pytest.raises(ValueError, match="valid: cam, gradcam, gradcampp"):
    cams.class_maps(head, a, "scorecam")
  logits, vjp_fn = jax.vjp(head, a)
  with pytest.raises(ValueError, match="valid: cam, gradcam, gradcampp"):
    cams.maps_from_vjp(vjp_fn, logits, a, "gradcam++")


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_gradcampp_closed_form_gap_dense(num_outputs):
  """GAP + dense: g = W[k, c] / (h w) is constant over the grid, so alpha_k = 1 / (2 + S_k g_k)
  and w_k = h w alpha_k relu(g_k) = relu(W[k, c]) / (2 + mean_ij(A_k) W[k, c])."""
  ka, kw, kb = jax.random.split(jax.random.key(7), 3)
  n, h, w, c = 3, 4, 5, 6
  a = jax.random.uniform(ka, (n, h, w, c), maxval=2.0)
  kernel = jax.random.normal(kw, (c, num_outputs))
  bias = jax.random.normal(kb, (num_outputs,))
  head = lambda f: f.mean(axis=(1, 2)) @ kernel + bias
  # Class-score columns: W[:, c] (K = 2) or -W, +W (K = 1: scores -z and +z).
  cols = kernel.T if num_outputs == 2 else jnp.stack([-kernel[:, 0], kernel[:, 0]])  # (2, C)
  g_k = cols[:, None, :] / (h * w)  # (2, 1, C)
  s_k = a.sum(axis=(1, 2))[None]  # (1, N, C)
  alpha_k = 1.0 / (2.0 + s_k * g_k)  # (2, N, C)
  expected = h * w * alpha_k * jax.nn.relu(g_k)
  np.testing.assert_allclose(
    expected, jax.nn.relu(cols[:, None]) / (2 + a.mean((1, 2)) * cols[:, None]), rtol=1e-5
  )

  _, g = _grads(head, a)
  alpha = cams.gradcampp_alpha(g, a)
  np.testing.assert_allclose(
    alpha, jnp.broadcast_to(alpha_k[:, :, None, None], alpha.shape), rtol=1e-5
  )
  weights = cams.KINDS["gradcampp"](g, a)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
  _, maps = cams.class_maps(head, a, "gradcampp")
  np.testing.assert_allclose(maps, jnp.einsum("cnk,nhwk->cnhw", expected, a), rtol=1e-5, atol=1e-6)


def test_gradcampp_closed_form_model_head():
  """The same oracle on the real model head (params['head']['kernel'])."""
  variables, a, head = _model()
  kernel = variables["params"]["head"]["kernel"]  # (C, 2)
  _, maps = cams.class_maps(head, a, "gradcampp")
  cols = kernel.T[:, None]  # (2, 1, C)
  weights = jax.nn.relu(cols) / (2.0 + a.mean(axis=(1, 2))[None] * cols)
  np.testing.assert_allclose(maps, jnp.einsum("cnk,nhwk->cnhw", weights, a), rtol=1e-4, atol=1e-6)


def _diagonal_derivatives(y, a):
  """First, second and third derivatives of the scalar y(A) w.r.t. each element A_ij^k alone
  (the diagonal of the higher derivatives), by forward mode along each one-hot direction."""

  def along(e):
    f = lambda t: y(a + t * e)
    d1 = jax.jacfwd(f)
    d2 = jax.jacfwd(d1)
    d3 = jax.jacfwd(d2)
    return d1(0.0), d2(0.0), d3(0.0)

  eye = jnp.eye(a.size, dtype=a.dtype).reshape((a.size,) + a.shape)
  return [d.reshape(a.shape) for d in jax.jit(jax.vmap(along))(eye)]


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_gradcampp_equals_paper_formula_with_higher_derivatives(num_outputs):
  """Grad-CAM++ from the first derivative only equals the paper's formula in the derivatives of
  Y_c = exp(S_c): alpha = d2Y / (2 d2Y + sum_ab A_ab d3Y), w = sum alpha relu(dY) / exp(S_c).

  The identities d2Y = exp(S) g^2 and d3Y = exp(S) g^3 behind it need d2S/dA_ij^k2 = 0, i.e. a
  head linear in each element of A; so the head here is NOT GAP + dense but a spatially weighted
  pooling sum_ij P_ij A_ij (random positive P, so g varies over the grid) then a dense layer.
  """
  ka, kp, kw, kb = jax.random.split(jax.random.key(3), 4)
  n, h, w, c = 2, 3, 4, 3
  a = jax.random.uniform(ka, (n, h, w, c))
  pool = jax.random.uniform(kp, (h, w), minval=0.1, maxval=1.0) / (h * w)
  kernel = jax.random.normal(kw, (c, num_outputs))
  bias = 0.1 * jax.random.normal(kb, (num_outputs,))
  head = lambda f: jnp.einsum("nhwk,hw->nk", f, pool) @ kernel + bias

  logits, g = _grads(head, a)
  assert float(jnp.ptp(g, axis=(2, 3)).min()) > 0  # not constant over the grid
  alpha = cams.gradcampp_alpha(g, a)
  weights = cams.KINDS["gradcampp"](g, a)
  s_k = a.sum(axis=(1, 2), keepdims=True)
  for cls in (0, 1):
    score = (
      (lambda f: head(f)[:, cls])
      if num_outputs == 2
      else (lambda f: (2.0 * cls - 1.0) * head(f)[:, 0])
    )
    y = lambda f: jnp.sum(jnp.exp(score(f)))  # samples independent: diagonal = per-sample Y
    d1, d2, d3 = _diagonal_derivatives(y, a)
    exp_s = jnp.exp(score(a))[:, None, None, None]
    np.testing.assert_allclose(d1, exp_s * g[cls], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d2, exp_s * g[cls] ** 2, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(d3, exp_s * g[cls] ** 3, rtol=1e-5, atol=1e-9)
    den = 2 * d2 + s_k * d3
    alpha_paper = jnp.where(d2 != 0, d2 / jnp.where(d2 != 0, den, 1.0), 0.0)
    np.testing.assert_allclose(alpha[cls], alpha_paper, rtol=1e-5)
    w_paper = jnp.sum(alpha_paper * jax.nn.relu(d1), axis=(1, 2)) / exp_s[:, 0, 0]
    np.testing.assert_allclose(weights[cls], w_paper, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(weights[cls]).max()) > 0

  # Independent check of d2Y for one element: central second difference in float64 numpy.
  a64, p64 = np.asarray(a, np.float64), np.asarray(pool, np.float64)
  k64, b64 = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
  y_np = lambda f: np.exp(np.einsum("nhwk,hw->nk", f, p64) @ k64 + b64)[0, -1]  # Y of z_last
  idx, eps = (0, 1, 2, 1), 1e-3
  e = np.zeros_like(a64)
  e[idx] = eps
  fd = (y_np(a64 + e) - 2 * y_np(a64) + y_np(a64 - e)) / eps**2
  y_last = lambda f: jnp.sum(jnp.exp(head(f)[:, -1]))
  _, d2, _ = _diagonal_derivatives(y_last, a)
  np.testing.assert_allclose(float(d2[idx]), fd, rtol=1e-4)
  np.testing.assert_allclose(fd, np.exp(logits[0, -1]) * (p64[1, 2] * k64[1, -1]) ** 2, rtol=1e-5)


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_gradcampp_both_maps_from_one_vjp(num_outputs):
  _, a, head = _model(num_outputs)
  calls = []

  def counted(f):
    calls.append(1)
    return head(f)

  _, maps = cams.class_maps(counted, a, "gradcampp")
  assert len(calls) == 1  # one vjp of the head (its vmap over the two cotangents re-uses it)
  for cls in (0, 1):
    sign = (1.0 if cls == 1 else -1.0) if num_outputs == 1 else 1.0
    idx = 0 if num_outputs == 1 else cls
    g = jax.grad(lambda f: sign * jnp.sum(head(f)[:, idx]))(a)  # per-sample (rows independent)
    _, w = _gradcampp_literal(g[None], a)
    expected = np.einsum("nk,nhwk->nhw", w[0], np.asarray(a, np.float64))
    np.testing.assert_allclose(maps[cls], expected, rtol=1e-4, atol=1e-6)
  if num_outputs == 1:  # not linear in g: the class-0 map is no longer the negated class-1 map
    assert not np.allclose(maps[0], -maps[1])


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_gradcampp_separating_toy_is_non_negative(num_outputs):
  """Perfectly separated toy: class-1 samples light channel 0 on a blob, class-0 samples channel
  1; A >= 0, so the Grad-CAM++ weights are >= 0 by construction and each true-class map is the
  blob, while Grad-CAM's class-contrast weights have negative entries."""
  n, h, w = 4, 6, 6
  labels = jnp.array([0, 1, 0, 1])
  blob = jnp.zeros((n, h, w)).at[:, 1:4, 2:5].set(1.0)
  a = jnp.stack([blob * (labels == 1)[:, None, None], blob * (labels == 0)[:, None, None]], -1)
  kernel = jnp.array([[-1.0, 1.0], [1.0, -1.0]]) if num_outputs == 2 else jnp.array([[1.0], [-1.0]])
  head = lambda f: f.mean(axis=(1, 2)) @ kernel
  logits, g = _grads(head, a)
  np.testing.assert_array_equal(losses.predicted_class(logits), labels)
  weights = cams.KINDS["gradcampp"](g, a)
  assert float(weights.min()) >= 0.0
  assert float(cams.KINDS["gradcam"](g, a).min()) < 0.0
  _, maps = cams.class_maps(head, a, "gradcampp")
  assert float(maps.min()) >= 0.0
  true_map = cams.normalize(cams.select(maps, labels))
  np.testing.assert_allclose(true_map, blob, atol=1e-6)


def test_gradcampp_second_order_gradients_are_finite():
  """The loss differentiates the maps again w.r.t. the parameters: finite, through the g == 0
  guard too (a zeroed kernel row makes g == 0 for that channel)."""
  variables, a, _ = _model()
  params = variables["params"]
  params = {**params, "head": {**params["head"], "kernel": params["head"]["kernel"].at[0].set(0.0)}}
  cfg = ml_collections.ConfigDict(dict(name="tiny", width=8, stem="small", num_outputs=2))
  model = models.get_model(cfg)

  def loss(p, f):
    _, maps = cams.class_maps(
      lambda x: model.apply({"params": p}, x, method="head"), f, "gradcampp"
    )
    return jnp.sum(cams.normalize(maps) ** 2)

  head = lambda x: model.apply({"params": params}, x, method="head")
  _, g = _grads(head, a)
  np.testing.assert_array_equal(g[..., 0], 0.0)
  np.testing.assert_array_equal(cams.gradcampp_alpha(g, a)[..., 0], 0.0)  # alpha = 0 where g = 0
  assert float(cams.gradcampp_alpha(g, a)[..., 1:].min()) > 0
  gp, gf = jax.grad(loss, argnums=(0, 1))(params, a)
  for leaf in jax.tree.leaves(gp) + [gf]:
    assert np.all(np.isfinite(leaf))
  assert float(jnp.abs(gp["head"]["kernel"]).sum()) > 0
