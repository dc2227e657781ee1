"""Input preprocessing on the device, inside the jitted steps.

Batches travel as uint8 (images (N, H, W, C_stored), human maps (N, H, W)): a quarter of the
bytes of float32, a twelfth for gray images of an RGB model. On the device:

* scaling: ``x * (1/255)`` in float32 (the same operation the host used to do, so results are
  bit-identical to host preprocessing); float inputs are used as they are;
* gray -> RGB: a 1-channel batch is replicated to ``channels`` (3) channels;
* mean/std normalisation stays inside the model (`models.Classifier.features`);
* augmentation (training only): a left-right flip with probability 1/2 and a translation by
  (dy, dx) uniform in [-crop, crop]^2 with zero fill (= zero-padding by ``crop`` and cropping
  back at a random offset), applied identically to the image and its human map. The draws of
  a row come from ``(seed, step, global row index)`` (`row_keys`), so they do not depend on
  the device count or on how the batch is split, and a resumed run draws what an uninterrupted
  run would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

AUGMENT_STREAM = 1  # ActDiff's per-row keys use stream 0 (see `row_keys`)


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Static input settings of the steps: the model's channel count and the augmentation."""

  channels: int | None = None  # None: as stored
  flip: bool = False
  crop: int = 0

  @property
  def augments(self) -> bool:
    return self.flip or self.crop > 0


def from_config(data_config) -> InputConfig:
  return InputConfig(
    channels=int(data_config.channels),
    flip=bool(data_config.augment_flip),
    crop=int(data_config.augment_crop),
  )


def row_keys(rng, step, first_row, n: int, stream: int):
  """One PRNG key per row: fold_in(fold_in(fold_in(seed key, stream), step), global row)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), stream), step)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_row + jnp.arange(n))


def to_unit(x):
  """uint8 -> float32 in [0, 1]; floating inputs unchanged."""
  return x.astype(jnp.float32) * jnp.float32(1 / 255) if x.dtype == jnp.uint8 else x


def augment_params(keys, crop: int):
  """Per-row (flip bool (n,), shift int32 (n, 2)) from per-row keys."""

  def one(key):
    k_flip, k_shift = jax.random.split(key)
    flip = jax.random.uniform(k_flip) < 0.5
    shift = jax.random.randint(k_shift, (2,), -crop, crop + 1, dtype=jnp.int32)
    return flip, shift

  return jax.vmap(one)(keys)


def flip_and_shift(x, flip, shift, crop: int):
  """One row (H, W, ...): mirrored left-right if ``flip``, then translated by ``shift``."""
  x = jnp.where(flip, x[:, ::-1], x)
  if crop == 0:
    return x
  pad = [(crop, crop), (crop, crop)] + [(0, 0)] * (x.ndim - 2)
  start = (crop - shift[0], crop - shift[1]) + (jnp.zeros_like(shift[0]),) * (x.ndim - 2)
  return jax.lax.dynamic_slice(jnp.pad(x, pad), start, x.shape)


def prepare(batch: dict, cfg: InputConfig, keys=None) -> dict:
  """The model's inputs from a (uint8) batch; ``keys`` (one per row) turn augmentation on."""
  image, saliency = to_unit(batch["image"]), to_unit(batch["saliency"])
  if keys is not None and cfg.augments:
    flip, shift = augment_params(keys, cfg.crop)
    flip = flip if cfg.flip else jnp.zeros_like(flip)
    move = jax.vmap(flip_and_shift, in_axes=(0, 0, 0, None))
    image, saliency = (move(x, flip, shift, cfg.crop) for x in (image, saliency))
  if cfg.channels is not None and image.shape[-1] != cfg.channels:
    if image.shape[-1] != 1:
      raise ValueError(f"cannot turn {image.shape[-1]}-channel images into {cfg.channels}")
    image = jnp.broadcast_to(image, image.shape[:-1] + (cfg.channels,))
  return {**batch, "image": image, "saliency": saliency}
