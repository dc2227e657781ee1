"""ViT backbones (`models.vit`): the GAP head's CAM is W^T A, the class-token head's one-vjp maps
are Grad-CAM computed the slow way (one gradient per class through the whole model), every loss
term trains a tiny ViT on 1 and 4 devices alike, and the settings that cannot work are refused.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import EVERY_TERM, step_batch

from divisive_jax import cams, config_base, losses, models, sharding, step
from divisive_jax import state as state_lib
from divisive_jax.errors import ConfigError
from divisive_jax.models import vit

S = 16  # 16 px, patch 4: a 4 x 4 grid


def _model(pool, dtype="float32", depth=2):
  """A ViT of ``depth`` blocks, width 16, at patch 4 (what `models.get_model` builds, smaller)."""
  backbone = vit.ViT(4, 16, depth, 2, 32, pool=pool, dtype=models.DTYPES[dtype])
  return models.Classifier(backbone)


def _images(n=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, S, S, 3)), jnp.float32)


def test_gap_head_cam_is_w_transpose_a():
  model, x = _model("gap"), _images()
  variables = model.init(jax.random.key(0), x)
  a = model.apply(variables, x, method="features")
  assert a.shape == (3, 4, 4, 16) and a.dtype == jnp.float32
  head = lambda f: model.apply({"params": variables["params"]}, f, method="head")
  logits, maps = cams.class_maps(head, a, "cam")
  w = variables["params"]["head"]["kernel"]  # (16, 2)
  np.testing.assert_allclose(maps, jnp.einsum("nhwk,kc->cnhw", a, w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6, atol=1e-6)


def _logits_with_offset(module, x, offset, head):
  """The whole model, the patch tokens entering the last block moved by ``offset``: written out
  from the ViT's own layers and the ``head`` parameters, not through `features` / `head`."""
  bb = module.backbone
  x = (x - jnp.asarray(models.IMAGENET_MEAN)) / jnp.asarray(models.IMAGENET_STD)
  n = x.shape[0]
  patches = bb.conv_proj(x).reshape(n, -1, bb.width)
  tokens = bb.position(
    jnp.concatenate([jnp.broadcast_to(bb.class_token, (n, 1, bb.width)), patches], 1)
  )
  for block in bb.layers[:-1]:
    tokens = block(tokens)
  tokens = tokens.at[:, 1:].add(offset.reshape(n, -1, bb.width))
  cls = bb.ln(bb.layers[-1](tokens))[:, 0]
  return cls @ head["kernel"] + head["bias"]


@pytest.mark.parametrize("kind", ["gradcam", "gradcampp"])
def test_cls_head_maps_equal_per_class_gradcam_the_slow_way(kind):
  model, x = _model("cls"), _images()
  variables = model.init(jax.random.key(1), x)
  a, cls = model.apply(variables, x, method="features")
  assert a.shape == (3, 4, 4, 16) and cls.shape == (3, 1, 16)
  head = lambda f: model.apply({"params": variables["params"]}, f, method="head")
  logits, maps = cams.class_maps(head, (a, cls), kind)  # one vjp, both classes
  slow = lambda o: nn.apply(_logits_with_offset, model)(
    variables, x, o, variables["params"]["head"]
  )
  np.testing.assert_allclose(logits, slow(jnp.zeros_like(a)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6, atol=1e-6)
  for c in (0, 1):
    g = jax.grad(lambda o: slow(o)[:, c].sum())(jnp.zeros_like(a))  # dlogit_c / dA, per class
    w = cams.KINDS[kind](g[None], a)[0]  # (N, C)
    np.testing.assert_allclose(maps[c], jnp.einsum("nk,nhwk->nhw", w, a), rtol=2e-4, atol=2e-5)
  assert float(jnp.abs(maps[0] - maps[1]).max()) > 1e-3  # the two classes' maps differ


def _train(num_devices, steps=2):
  """``steps`` float64 steps of every term on a one-block class-token ViT (Grad-CAM maps; its
  head is that block's class-token path, `A` the patch tokens entering it)."""
  with jax.enable_x64(True):
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    model = _model("cls", "float64", depth=1)
    variables = model.init(jax.random.key(0), jnp.zeros((1, S, S, 3)))
    assert "batch_stats" not in variables
    tx = optax.sgd(0.05, momentum=0.9)
    loss_cfg = losses.LossConfig(weights=losses.parse_weights(EVERY_TERM), cam_kind="gradcam")
    state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats={},
      opt_state=tx.init(variables["params"]),
      rng=jax.random.key_data(jax.random.key(1)),
      loss_weights=state_lib.loss_weights(loss_cfg),
    )
    state = jax.device_put(state, sharding.replicated(mesh))
    train_step = step.make_train_step(model, loss_cfg, tx, mesh)
    for i in range(steps):
      state, metrics = train_step(state, sharding.to_global(step_batch(i, channels=3), mesh))
    return jax.device_get(state), jax.device_get(metrics)


def test_every_term_trains_a_vit_alike_on_one_and_four_devices():
  s1, m1 = _train(1)
  s4, m4 = _train(4)
  assert m1["finite"] == 1.0 and int(s1.step) == 2
  for term, weight in EVERY_TERM.items():
    assert np.isfinite(m1[f"loss/{term}"]) and (term == "ce" or m1[f"loss/{term}"] != 0), term
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  for k in m1:
    assert m1[k] == pytest.approx(m4[k], rel=1e-6, abs=1e-9), k


def _config(**model):
  c = config_base.base()
  config_base.apply_variants(c, "vit_tiny", lambda c: None)
  c.data.image_size = 64
  c.model.update(model)
  return c


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(pool="mean"), r"config.model.pool='mean' is not valid; valid: gap, cls"),
    (dict(patch_size=12), r"image_size=64 is not a multiple of the ViT patch size 12 .* Fix"),
    (dict(width=16), r"width=16 are CNN settings; a ViT's size is its name \(vit_tiny\)"),
    (dict(pool="cls"), r"cam_kind='cam' needs a linear head .* Fix: .*cam_kind=gradcam"),
    (
      dict(name="tiny", pool="cls"),
      r"pool / patch_size / vit_style are ViT settings; tiny is a CNN",
    ),
  ],
)
def test_settings_that_cannot_work_are_refused(change, match):
  config_base.validate(_config())  # the variant itself is valid
  with pytest.raises(ConfigError, match=match):
    config_base.validate(_config(**change))


def test_the_quick_vit_variant_validates():
  from configs import iris_pad

  c = iris_pad.get_config("quick,vit_tiny")
  config_base.validate(c)
  assert (c.model.name, c.model.stem, c.model.width, c.data.image_size) == (
    "vit_tiny",
    "imagenet",
    64,
    64,
  )
  assert state_lib.feature_grid(c) == (8, 8)  # patch 8 at 64 px
