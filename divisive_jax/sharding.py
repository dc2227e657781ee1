"""The device mesh and the shardings of states and batches.

One 1-D mesh ``('data',)`` over all devices of all processes. States are replicated (``P()``);
batches are split along their first axis (``P('data')``), each process providing its own
contiguous rows (`to_global`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"
# Batch fields that go to the device; `id` (strings) and `attack_type` stay on the host.
DEVICE_KEYS = ("image", "label", "saliency", "has_saliency", "valid")


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over all devices of all processes, in `jax.devices()` order
  (process-major): process p's devices hold its contiguous rows of every batch, as `to_global`,
  the data pipeline and `multihost.gather_rows` assume (`jax.make_mesh` may reorder devices for
  a TPU topology)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def to_global(local_batch: dict, mesh, keys=DEVICE_KEYS) -> dict:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k])) for k in keys
  }
