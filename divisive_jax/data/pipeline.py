"""Batches from random-access sources: deterministic shuffling, process sharding, padded eval.

Conventions
-----------
* The training stream is the concatenation of epochs; epoch ``e`` is the permutation of the
  source drawn from ``(seed, 0, e)``. Global batch ``k`` holds stream positions
  ``[k * B, (k + 1) * B)`` (B = global batch size; a batch may straddle two epochs, so no
  example is dropped and every epoch visits each example once). Process ``p`` of ``P``
  yields rows ``[p * L, (p + 1) * L)`` of each global batch, ``L = B // P``. Batch ``k``
  therefore depends only on ``(seed, k)`` (`batch_indices`): resuming at ``start_step=k``
  continues exactly, the processes' local batches tile the single-process global batch, and
  a device-resident training set (`divisive_jax.data.on_device`) is indexed with the very same
  indices, so both paths train on the same batches.
* Batches hold uint8 images and maps as the sources store them (see `divisive_jax.data`).
* Evaluation visits the source in order with global batch ``k`` = examples
  ``[k * B, (k + 1) * B)``; rows past the end are zeros with ``valid = 0`` (``attack_type``
  -1, ``id`` ''), so all processes yield ``ceil(n / B)`` batches and each example is visited
  exactly once across processes.
* A background thread reads batches ahead (``prefetch``): one `read` call per batch, so the
  host does no per-example work in Python.

Why plain numpy and a thread, not grain: the contract above is a few lines of index arithmetic,
and with batched reads of decoded uint8 arrays there is no per-example decoding left for worker
processes to spread.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

_SHUFFLE = 0  # seed-sequence tag of the shuffling stream


class Source:
  """Base of the sources of `divisive_jax.data`: ``len``, ``src[i]`` and `batch`, from the columns
  ``label``, ``attack_type``, ``has_saliency`` and ``ids`` that the subclass sets."""

  def __len__(self) -> int:
    return len(self.label)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {k: v[0] for k, v in self.read([index]).items()}

  def batch(self, idx, image, saliency) -> dict[str, Any]:
    """The batch of examples ``idx`` (an int array) holding ``image`` and ``saliency``."""
    return {
      "image": image,
      "label": self.label[idx],
      "saliency": saliency,
      "has_saliency": self.has_saliency[idx].astype(np.float32),
      "attack_type": self.attack_type[idx],
      "id": self.ids[idx],
    }

  def read_maps(self, indices) -> np.ndarray:
    """The maps (n, H, W) uint8 of examples ``indices`` (a source may read them alone)."""
    return self.read(indices)["saliency"]


class Wrapper(Source):
  """A source that reads through ``source``, its columns copied: the base of the sources that
  change the maps of another's batches (`controls`, `map_sources`)."""

  def __init__(self, source):
    self._source, self.channels, self.ids = source, source.channels, source.ids
    self.label, self.attack_type = source.label, source.attack_type
    self.has_saliency = source.has_saliency


def local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be positive and divisible "
      f"by the process count {process_count}."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=64)  # a population on the device: one order per member
def _permutation(seed: int, n: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(n)


def batch_indices(n: int, global_batch_size: int, seed: int, step: int) -> np.ndarray:
  """Source indices (B,) of global training batch ``step`` (see module docstring)."""
  positions = step * global_batch_size + np.arange(global_batch_size)
  epochs = positions // n
  out = np.empty(global_batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = _permutation(seed, n, int(e))[positions[sel] % n]
  return out


class _Prefetch(Iterator):
  """Iterator over ``make(step)`` for successive steps, computed ahead in a thread.

  The thread holds no reference to the iterator, so dropping the iterator (or ``close()``)
  stops it; an exception in ``make`` is re-raised by ``next``.
  """

  _END = object()

  def __init__(self, make: Callable[[int], Any], steps: Iterator[int], prefetch: int):
    self._queue = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    threading.Thread(
      target=self._run, daemon=True, args=(make, steps, self._queue, self._stop)
    ).start()

  @classmethod
  def _run(cls, make, steps, out, stop):
    def put(item):
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          return
        except queue.Full:
          pass

    try:
      for step in steps:
        if stop.is_set():
          return
        put(make(step))
      put(cls._END)
    except Exception as e:  # handed to the consumer
      put(e)

  def __next__(self):
    item = self._queue.get()
    if item is self._END or isinstance(item, Exception):
      self._queue.put(item)  # for the next call: the end stays the end, an error stays raised
      raise StopIteration if item is self._END else item
    return item

  def close(self):
    self._stop.set()

  __del__ = close


def train_batches(
  source,
  global_batch_size: int,
  *,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of local training batches from step ``start_step``; see module doc.

  ``close()`` the iterator (or drop it) to stop its background thread.
  """
  rows = local_rows(global_batch_size, process_index, process_count)
  n = len(source)
  if n == 0:
    raise ValueError("cannot draw training batches from an empty source.")

  def make(step):
    batch = source.read(batch_indices(n, global_batch_size, seed, step)[rows])
    batch["valid"] = np.ones(len(batch["label"]), np.float32)
    return batch

  return _Prefetch(make, itertools.count(start_step), prefetch)


def eval_batches(
  source,
  global_batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """Local evaluation batches in source order, last one padded; see module docstring."""
  rows = local_rows(global_batch_size, process_index, process_count)
  n = len(source)

  def make(step):
    positions = (step * global_batch_size + np.arange(global_batch_size))[rows]
    valid = positions < n
    batch = source.read(positions[valid])
    pad = int(np.sum(~valid))
    if pad:  # padding rows: zeros, no attack type, no id
      fill = {"attack_type": -1, "id": ""}
      for k, v in batch.items():
        extra = np.full((pad,) + v.shape[1:], fill.get(k, 0), v.dtype if k != "id" else object)
        batch[k] = np.concatenate([v, extra]).astype(v.dtype if k != "id" else str)
    batch["valid"] = valid.astype(np.float32)
    return batch

  return _Prefetch(make, iter(range(-(-n // global_batch_size))), prefetch)


def to_host_floats(batch: dict) -> dict:
  """uint8 images and maps of a host batch as float32 in [0, 1] (for evaluators and figures),
  with the device's scaling (`preprocess.to_unit`)."""
  out = dict(batch)
  for key in ("image", "saliency"):
    if key in out and np.asarray(out[key]).dtype == np.uint8:
      out[key] = np.asarray(out[key]).astype(np.float32) * np.float32(1 / 255)
  return out
