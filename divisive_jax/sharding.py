"""The device mesh and the shardings of states and batches.

One mesh over all devices of all processes, with two axes: ``('bn_groups', 'data')`` of shape
(devices / g, g), g = ``config.model.bn_group`` (0: every device, the default, shape (1, N)).
States are replicated (``P()``); batches are split along their first axis over both axes
(``P(AXIS)``), each process providing its own contiguous rows (`to_global`); gradients and
losses are summed over both (`AXIS`), BatchNorm's batch statistics over ``'data'`` only
(`BN_AXIS`): each group of g consecutive devices normalises with its own statistics, the option
TPU ResNet recipes use on pods (one small all-reduce per BN layer over g chips instead of all).
The running statistics are then averaged over the groups once per step (`step.py`), so the state
stays replicated: the running mean is the all-device one, the variance the groups' mean variance.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from divisive_jax.errors import ConfigError

# The batch axis: every device (both mesh axes). BatchNorm statistics: the devices of one group.
BN_GROUPS, BN_AXIS = "bn_groups", "data"
AXIS = (BN_GROUPS, BN_AXIS)
# Batch fields that go to the device; `id` (strings) and `attack_type` stay on the host.
DEVICE_KEYS = ("image", "label", "saliency", "has_saliency", "valid")


def make_mesh(devices=None, bn_group: int = 0) -> jax.sharding.Mesh:
  """The ('bn_groups', 'data') mesh over all devices of all processes, in `jax.devices()` order
  (process-major): process p's devices hold its contiguous rows of every batch, as `to_global`,
  the data pipeline and `multihost.gather_rows` assume (`jax.make_mesh` may reorder devices for
  a TPU topology). BatchNorm groups are ``bn_group`` consecutive devices (0: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices).reshape(-1, group_size(bn_group, len(devices))), AXIS)


def group_size(bn_group: int, devices: int) -> int:
  """The devices of a BatchNorm group (``bn_group``; 0: all); `ConfigError` unless it divides
  the device count."""
  group = int(bn_group) or devices
  if group < 1 or devices % group:
    raise ConfigError(
      f"config.model.bn_group={bn_group} must divide the number of devices ({devices}); e.g. "
      f"--config.model.bn_group={jax.local_device_count()} (one host's devices) or 0 (all)"
    )
  return group


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def to_global(local_batch: dict, mesh, keys=DEVICE_KEYS) -> dict:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over `AXIS`."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k])) for k in keys
  }
