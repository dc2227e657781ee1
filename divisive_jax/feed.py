"""Feeding the train step: batches transferred ahead, or the whole training split on device.

* `DevicePrefetch`: host batches (uint8, `data.pipeline.train_batches`) become global device
  arrays ``size`` steps ahead, so the transfer of batch k+1 overlaps step k (double buffering
  for ``size=2``; `jax.make_array_from_process_local_data` returns before the copy completes).
* `ResidentData`: for training splits that fit in device memory (``config.data.on_device``):
  the split is copied once, replicated on every device, and a dispatch of k steps needs only
  the (k, B) int32 indices of its batches (`data.pipeline.batch_indices`, the same batches as
  the host path), sharded over 'data' along B.
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from divisive_jax import config_base, sharding
from divisive_jax import step as step_lib
from divisive_jax.data import pipeline

RESIDENT_KEYS = ("image", "saliency", "label", "has_saliency")


def host_batches(config, split, mesh, start_step: int) -> "DevicePrefetch":
  """The trainer's host feed: this process's rows of the training order of
  `config_base.shuffle_seed` from ``start_step`` on (`pipeline.train_batches`), transferred
  ``config.data.prefetch`` batches ahead."""
  return DevicePrefetch(
    pipeline.train_batches(
      split,
      int(config.batch_size),
      seed=config_base.shuffle_seed(config),
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    mesh,
    size=int(config.data.prefetch),
  )


class DevicePrefetch:
  """Iterator of global batches, ``size`` transfers in flight ahead of the consumer."""

  def __init__(self, host_batches, mesh, size: int = 2):
    self.host, self.mesh, self.size = host_batches, mesh, max(1, int(size))
    self.queue = collections.deque()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self.queue) < self.size:
      self.queue.append(sharding.to_global(next(self.host), self.mesh))
    return self.queue.popleft()

  def close(self):
    self.queue.clear()
    self.host.close()


class ResidentData:
  """The whole training split on the devices; `indices` builds a dispatch's batch indices."""

  def __init__(self, source, mesh, global_batch_size: int, seed: int):
    arrays = source.read(np.arange(len(source)))
    rep = sharding.replicated(mesh)
    self.arrays = {k: jax.device_put(np.asarray(arrays[k]), rep) for k in RESIDENT_KEYS}
    self.n, self.batch, self.seed, self.mesh = len(source), global_batch_size, seed, mesh
    self.nbytes = sum(int(np.asarray(arrays[k]).nbytes) for k in RESIDENT_KEYS)
    self._rows = pipeline.local_rows(global_batch_size, jax.process_index(), jax.process_count())

  def indices(self, first_step: int, k: int, seeds):
    """int32 global array of the source indices of steps [first_step, first_step + k), one
    training order per seed of ``seeds`` (one per member): (k, P, B), or (k, B) for one member
    (`step.join_members`)."""
    steps = range(first_step, first_step + k)
    orders = [
      np.array([pipeline.batch_indices(self.n, self.batch, s, t) for t in steps]) for s in seeds
    ]
    idx = step_lib.join_members(orders, stack=lambda xs: np.stack(xs, axis=1)).astype(np.int32)
    spec = (None,) * (idx.ndim - 1) + (sharding.AXIS,)
    sharded = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.make_array_from_process_local_data(sharded, idx[..., self._rows])

  def close(self):
    self.arrays = {}
