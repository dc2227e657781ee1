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
