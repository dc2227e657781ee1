"""Loss terms: hand-computed values, masking of examples without maps, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divisive_jax import cams, config_base, losses, step


def _batch(n=4, size=8, has=None, seed=0):
  rng = np.random.default_rng(seed)
  sal = np.zeros((n, size, size), np.float32)
  sal[:, 2:6, 2:6] = 1.0
  return {
    "image": jnp.asarray(rng.random((n, size, size, 1), np.float32)),
    "label": jnp.asarray(np.arange(n) % 2, jnp.int32),
    "saliency": jnp.asarray(sal),
    "has_saliency": jnp.ones(n) if has is None else jnp.asarray(has, jnp.float32),
    "valid": jnp.ones(n),
  }


def _cfg(**weights):
  return losses.LossConfig(weights=losses.parse_weights(weights))


def test_ce_two_logit_single_logit_and_class_weights():
  b = _batch()
  z = jnp.array([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 1.0]])
  loss, parts = losses.combine({"logits": z}, b, _cfg(ce=1.0))
  expected = -np.mean(np.log(jax.nn.softmax(z)[np.arange(4), np.array(b["label"])]))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  z1 = jnp.array([[2.0], [-0.5], [0.3], [4.0]])
  y = np.array(b["label"])
  p = 1 / (1 + np.exp(-np.array(z1[:, 0])))
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert float(losses.combine({"logits": z1}, b, _cfg(ce=1.0))[0]) == pytest.approx(
    bce.mean(), 1e-5
  )
  w = (1.0, 3.0)
  cfg = losses.LossConfig(weights=(("ce", 1.0),), class_weights=w)
  per = -np.log(jax.nn.softmax(z)[np.arange(4), y])
  wy = np.array(w)[y]
  assert float(losses.combine({"logits": z}, b, cfg)[0]) == pytest.approx(
    np.sum(wy * per) / np.sum(wy), rel=1e-6
  )
  assert losses.balanced_class_weights([0, 0, 0, 1]) == pytest.approx((4 / 6, 2.0))


def test_examples_without_map_contribute_ce_only():
  b = _batch(has=[1, 0, 1, 0])
  maps = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  out = {"logits": jnp.zeros((4, 2)), "maps": maps}
  cfg = _cfg(ce=0.5, cyborg=0.5, opposition=1.0, difference=1.0, margin=1.0)
  loss, parts = losses.combine(out, b, cfg)
  # Changing the maps and images of the map-less rows changes nothing.
  b2 = dict(b, saliency=b["saliency"].at[1].set(0.7).at[3].set(0.0))
  maps2 = maps.at[:, 1].set(5.0 * maps[:, 1] + 1.0)
  loss2, parts2 = losses.combine(dict(out, maps=maps2), b2, cfg)
  for k in parts:
    assert float(parts[k]) == pytest.approx(float(parts2[k]), rel=1e-6), k
  # With no map at all the saliency terms are 0 (not a pull toward an all-zero map).
  b3 = _batch(has=[0, 0, 0, 0])
  _, parts3 = losses.combine(out, b3, cfg)
  for term in ("cyborg", "opposition", "difference", "margin"):
    assert float(parts3[term]) == 0.0
  g = jax.grad(lambda m: losses.combine(dict(out, maps=m), b3, _cfg(cyborg=1.0))[0])(maps)
  assert float(jnp.abs(g).sum()) == 0.0


def _perfect_maps(b):
  """Raw maps whose true-class map is H and false-class map is 1 - H (on the 8x8 grid)."""
  h = b["saliency"]
  y = b["label"][:, None, None]
  m1 = jnp.where(y == 1, h, 1 - h)
  m0 = jnp.where(y == 0, h, 1 - h)
  return jnp.stack([m0, m1])


def test_divisive_terms_vanish_on_a_perfect_model_and_not_otherwise():
  b = _batch()
  out = {"logits": jnp.zeros((4, 2)), "maps": _perfect_maps(b)}
  for term in ("cyborg", "opposition", "difference"):
    assert float(losses.combine(out, b, _cfg(**{term: 1.0}))[0]) == pytest.approx(0.0, abs=1e-7)
  flipped = dict(out, maps=out["maps"][::-1])
  for term in ("cyborg", "opposition", "difference", "margin"):
    assert float(losses.combine(flipped, b, _cfg(**{term: 1.0}))[0]) > 0.1, term


def test_margin_hand_computed():
  b = _batch(n=2)
  h = b["saliency"]
  # true map: 1 at (0, 0), false map: 1 at (7, 7), 0 elsewhere (normalised values are 0 or 1).
  true = jnp.zeros((2, 8, 8)).at[:, 0, 0].set(1.0)
  false = jnp.zeros((2, 8, 8)).at[:, 7, 7].set(1.0)
  y = b["label"][:, None, None]
  maps = jnp.stack([jnp.where(y == 0, true, false), jnp.where(y == 1, true, false)])
  cfg = losses.LossConfig(weights=(("margin", 1.0),), margin=0.3)
  val = float(losses.combine({"logits": jnp.zeros((2, 2)), "maps": maps}, b, cfg)[0])
  # Inside H (rows/cols 2..5) both normalised maps are 0: shortfall = m everywhere inside.
  assert val == pytest.approx(0.3, rel=1e-6)
  maps_ok = jnp.stack([jnp.where(y == 0, h, 0 * h), jnp.where(y == 1, h, 0 * h)])
  val_ok = float(losses.combine({"logits": jnp.zeros((2, 2)), "maps": maps_ok}, b, cfg)[0])
  assert val_ok == pytest.approx(0.0, abs=1e-7)


def test_difference_is_the_cam_of_the_logit_difference():
  b = _batch()
  raw = jax.random.normal(jax.random.key(3), (2, 4, 8, 8))
  y = b["label"]
  contrast = cams.select(raw, y) - cams.select(raw, 1 - y)
  expected = jnp.mean((cams.normalize(contrast) - cams.normalize(b["saliency"])) ** 2)
  got = losses.combine({"logits": jnp.zeros((4, 2)), "maps": raw}, b, _cfg(difference=1.0))[0]
  assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_input_gradient_terms_against_autodiff():
  b = _batch()
  w = jax.random.normal(jax.random.key(0), (64, 2))
  f = lambda x: x.reshape(x.shape[0], -1) @ w  # a linear "model"
  x = b["image"]
  logits = f(x)
  mbar = (1 - b["saliency"])[..., None]
  for name, scalar in (
    ("gradmask", lambda z: jnp.abs(z[:, 0] - z[:, 1])),
    ("rrr", lambda z: jnp.sum(jax.nn.log_softmax(z), axis=-1)),
  ):
    grads = jax.grad(lambda x: jnp.sum(scalar(f(x))))(x)
    _, vjp = jax.vjp(f, x)
    dx = vjp(losses.input_grad_cotangent(name, logits))[0]
    np.testing.assert_allclose(dx, grads, rtol=1e-5, atol=1e-6)
    out = {"logits": logits, "input_grads": {name: dx}}
    got = float(losses.combine(out, b, _cfg(**{name: 1.0}))[0])
    ref = (
      np.sum(np.abs(grads) * mbar, axis=(1, 2, 3))
      if name == "gradmask"
      else np.sum((mbar * grads) ** 2, axis=(1, 2, 3))
    )
    assert got == pytest.approx(float(np.mean(ref)), rel=1e-5)


def test_permute_outside_keeps_inside_and_the_outside_multiset():
  x = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(2, 6, 6, 1)
  mask = jnp.zeros((2, 6, 6)).at[:, 1:4, 1:4].set(1.0)
  keys = jax.random.split(jax.random.key(0), 2)
  xt = step.permute_outside(x, mask, keys)
  inside = np.asarray(mask, bool)
  np.testing.assert_array_equal(np.asarray(xt)[..., 0][inside], np.asarray(x)[..., 0][inside])
  for n in range(2):
    out_x = np.sort(np.asarray(x)[n, ..., 0][~inside[n]])
    out_t = np.sort(np.asarray(xt)[n, ..., 0][~inside[n]])
    np.testing.assert_array_equal(out_x, out_t)
  assert not np.array_equal(np.asarray(xt), np.asarray(x))


def test_masked_input_dilates_the_mask():
  b = _batch(n=2, has=[1, 0])
  b = dict(b, image=jnp.ones((2, 8, 8, 1)))
  out = step.masked_input(b, dilation=3)
  assert float(out[0, 1, 1, 0]) == 1.0 and float(out[0, 0, 0, 0]) == 0.0  # dilated by 1 px
  np.testing.assert_array_equal(out[1], 1.0)  # no map: unchanged


def test_config_validation_errors_name_the_valid_choices():
  with pytest.raises(ValueError, match="valid terms: ce, cyborg, difference"):
    losses.parse_weights({"ce": 1.0, "divergence": 1.0})
  with pytest.raises(ValueError, match=">= 0"):
    losses.parse_weights({"ce": -1.0})
  with pytest.raises(ValueError, match="no positive weight"):
    losses.parse_weights({"ce": 0.0})
  c = config_base.base()
  c.loss.cam_kind = "gradcam++"
  with pytest.raises(ValueError, match=r"config.loss.cam_kind='gradcam\+\+' is not valid; did you"):
    config_base.validate(c)
  assert losses.parse_weights({"rrr": 2.0, "ce": 1.0}) == (("ce", 1.0), ("rrr", 2.0))
