"""Multi-process helpers: one copy for the trainer and every CLI.

A job of several processes (a TPU pod, several GPU hosts, or processes on one machine) runs the
same program on every process; ``jax.distributed`` connects them. Conventions: every process
computes, process 0 alone writes files (`is_lead`), and `sync` is a barrier. On a single
process every helper here is a no-op or the identity.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

_STRING_WIDTH = 256  # bytes per string when gathering ids across processes


def define_flags() -> None:
  """The distributed flags shared by every entry point (absl)."""
  from absl import flags

  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() (multi-host jobs; "
    "TPU pods and SLURM are detected automatically).",
  )
  flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator HOST:PORT.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")


def initialize(flag_values) -> None:
  """``jax.distributed.initialize`` when the flags of `define_flags` ask for it."""
  if flag_values.distributed or flag_values.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=flag_values.coordinator_address,
      num_processes=flag_values.num_processes,
      process_id=flag_values.process_id,
    )


def is_lead() -> bool:
  """True on the process that writes files (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_agree(flag: bool) -> bool:
  """True iff ``flag`` is True on every process (a collective with several processes)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))
  return bool(np.all(np.asarray(flags)))


def to_host(x) -> np.ndarray:
  """A global (possibly multi-process) array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: dict) -> dict:
  """Host-local rows of a global batch -> the global batch's rows (process order) everywhere.

  Strings (ids) travel as fixed-width UTF-8 bytes; an id longer than `_STRING_WIDTH` bytes is
  an error rather than a silent truncation.
  """
  if jax.process_count() == 1:
    return dict(local)
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.dtype.kind in "USO":
      enc = [s.encode() for s in v.astype(str)]
      if any(len(e) > _STRING_WIDTH for e in enc):
        raise ValueError(f"an example id is longer than {_STRING_WIDTH} bytes; shorten the paths")
      codes = np.frombuffer(b"".join(e.ljust(_STRING_WIDTH, b"\0") for e in enc), np.uint8)
      codes = codes.reshape(len(v), _STRING_WIDTH)
      out[k] = np.array([bytes(r).rstrip(b"\0").decode() for r in to_host(codes)])
    else:
      out[k] = to_host(v)
  return out
