"""Preprocessing on the device: scaling, gray -> RGB, and augmentation that equals a numpy
reference, pairs image and map, and does not depend on the device count."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from divisive_jax import preprocess, sharding
from divisive_jax.preprocess import InputConfig

N, H, W = 8, 6, 7


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  image = rng.integers(1, 256, (N, H, W, 1), dtype=np.uint8)
  return {
    "image": image,
    "saliency": image[..., 0].copy(),  # the map is the image: the transforms must agree
    "label": np.arange(N, dtype=np.int32) % 2,
    "has_saliency": np.ones(N, np.float32),
    "valid": np.ones(N, np.float32),
  }


def _reference(x: np.ndarray, flip: bool, shift, crop: int) -> np.ndarray:
  """Numpy reference: mirror, then translate by (dy, dx) with zero fill."""
  x = x[:, ::-1] if flip else x
  if crop == 0:
    return x
  dy, dx = int(shift[0]), int(shift[1])
  out = np.zeros_like(x)
  h, w = x.shape[:2]
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
  ]
  return out


def _prepared(num_devices, cfg, seed=3, step=5):
  """prepare() inside shard_map over `num_devices` devices, keys from (seed, step, row)."""
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  rng = jax.random.key_data(jax.random.key(seed))

  def body(batch):
    n = batch["label"].shape[0]
    first = jax.lax.axis_index(sharding.AXIS) * n
    keys = preprocess.row_keys(rng, step, first, n, stream=preprocess.AUGMENT_STREAM)
    out = preprocess.prepare(batch, cfg, keys)
    flip, shift = preprocess.augment_params(keys, cfg.crop)
    return out["image"], out["saliency"], flip, shift

  f = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P(sharding.AXIS),), out_specs=P(sharding.AXIS))
  )
  return jax.device_get(f(sharding.to_global(_batch(), mesh)))


def test_scaling_and_gray_to_rgb():
  b = _batch()
  out = jax.device_get(preprocess.prepare(b, InputConfig(channels=3)))
  assert out["image"].shape == (N, H, W, 3) and out["image"].dtype == np.float32
  np.testing.assert_array_equal(out["image"][..., 2], b["image"][..., 0] * np.float32(1 / 255))
  np.testing.assert_array_equal(out["saliency"], b["saliency"] * np.float32(1 / 255))
  f = preprocess.prepare(dict(b, image=np.float32(0.25) + 0 * b["image"]), InputConfig())
  assert float(f["image"].max()) == 0.25  # float input is used as it is


@pytest.mark.parametrize("flip,crop", [(True, 0), (False, 2), (True, 2)])
def test_augmentation_equals_the_reference_and_pairs_image_and_map(flip, crop):
  cfg = InputConfig(channels=1, flip=flip, crop=crop)
  image, saliency, flips, shifts = _prepared(4, cfg)
  b = _batch()
  for i in range(N):
    want = _reference(b["image"][i].astype(np.float32) / 255, flip and flips[i], shifts[i], crop)
    np.testing.assert_allclose(image[i], want, atol=1e-7)
    np.testing.assert_array_equal(saliency[i], image[i][..., 0])
  if crop:
    assert np.all(np.abs(shifts) <= crop) and len({tuple(s) for s in shifts}) > 1
  if flip:
    assert 0 < int(np.sum(flips)) < N


def test_augmentation_does_not_depend_on_the_device_count():
  cfg = InputConfig(channels=1, flip=True, crop=2)
  one, four = _prepared(1, cfg), _prepared(4, cfg)
  for a, b in zip(one, four):
    np.testing.assert_array_equal(a, b)
  other_step = _prepared(4, cfg, step=6)
  assert not np.array_equal(one[0], other_step[0])  # a new draw each step
