"""Batches from random-access sources: deterministic shuffling, sharding, augmentation.

Conventions
-----------
* The training stream is the concatenation of epochs; epoch ``e`` is the permutation of the
  source drawn from ``(seed, 0, e)``. Global batch ``k`` holds stream positions
  ``[k * B, (k + 1) * B)`` (B = global batch size; a batch may straddle two epochs, so no
  example is dropped and every epoch visits each example once). Process ``p`` of ``P``
  yields rows ``[p * L, (p + 1) * L)`` of each global batch, ``L = B // P``. Batch ``k``
  therefore depends only on ``(seed, k)``: resuming at ``start_step=k`` continues exactly,
  and the processes' local batches tile the single-process global batch.
* Augmentation parameters for global batch ``k`` are drawn from ``(seed, 1, k)`` for all B
  rows at once (a flip bit and a (dy, dx) shift each, whether or not the augmentation is on)
  and each process applies its rows' draws, so they too depend only on ``(seed, k, row)``.
  A flip mirrors image and map left-right; ``crop = c`` translates both by (dy, dx) in
  [-c, c]^2 with zero fill — the same as zero-padding by c and cropping back at a random
  offset.
* Evaluation visits the source in order with global batch ``k`` = examples
  ``[k * B, (k + 1) * B)``; rows past the end are zeros with ``valid = 0`` (``attack_type``
  -1, ``id`` ''), so all processes yield ``ceil(n / B)`` batches and each example is visited
  exactly once across processes.
* Batches are numpy dicts with the keys of ARCHITECTURE.md: ``image``, ``label``,
  ``saliency``, ``has_saliency``, ``valid``, ``attack_type``, ``id``.

Why plain numpy and threads, not grain: the contract above (batch = f(seed, k), contiguous row
blocks per process, in-order padded evaluation) is a few lines of index arithmetic. Grain's
MapDataset would express the shuffle and batching too, but sharding by contiguous rows of a
global batch and padded evaluation would need custom transforms around it, and on the 2-core
machines this runs on grain must use ``worker_count=0`` (in-process), where it offers nothing
beyond a thread. Here a background thread builds batches ahead (``prefetch``), reading the
rows of a batch with ``num_threads`` threads (PNG decoding in PIL releases the GIL).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

_SHUFFLE, _AUGMENT = 0, 1  # seed-sequence tags that keep the two random streams apart
_DEFAULT_THREADS = min(8, os.cpu_count() or 1)


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be positive and divisible "
      f"by the process count {process_count}."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "id"}
  batch["id"] = np.array([str(e["id"]) for e in examples])
  return batch


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """``a`` (H, W, ...) translated by (dy, dx) pixels, zero fill."""
  out = np.zeros_like(a)
  h, w = a.shape[:2]
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
  ]
  return out


def _augment(
  batch: dict[str, np.ndarray],
  *,
  seed: int,
  step: int,
  rows: slice,
  global_batch_size: int,
  flip: bool,
  crop: int,
) -> dict[str, np.ndarray]:
  """Flips / translates ``image`` and ``saliency`` of ``batch`` (global rows ``rows``)."""
  rng = np.random.default_rng([seed, _AUGMENT, step])
  flips = rng.random(global_batch_size)[rows] < 0.5
  shifts = rng.integers(-crop, crop + 1, size=(global_batch_size, 2))[rows]

  def one(x, f, shift):
    x = x[:, ::-1] if flip and f else x
    return _shift(x, *shift) if crop else x

  for key in ("image", "saliency"):
    batch[key] = np.stack([one(x, f, s) for x, f, s in zip(batch[key], flips, shifts)])
  return batch


class _Prefetch:
  """Iterator over ``make(step, read)`` for successive steps, computed ahead in a thread.

  ``read(source, indices)`` reads examples with a pool of ``num_threads`` threads. The
  thread holds no reference to the iterator, so dropping the iterator (or ``close()``)
  stops it; an exception in ``make`` is re-raised by ``next``.
  """

  _END = object()

  def __init__(
    self,
    make: Callable[[int, Callable], Any],
    steps: Iterator[int],
    prefetch: int,
    num_threads: int,
  ):
    self._queue = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    threading.Thread(
      target=self._run, daemon=True, args=(make, steps, num_threads, self._queue, self._stop)
    ).start()

  @classmethod
  def _run(cls, make, steps, num_threads, out, stop):
    def put(item):
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          return
        except queue.Full:
          pass

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      read = lambda source, indices: list(pool.map(source.__getitem__, indices))
      try:
        for step in steps:
          if stop.is_set():
            return
          put(make(step, read))
        put(cls._END)
      except Exception as e:  # handed to the consumer
        put(e)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is self._END:
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, Exception):
      self._queue.put(item)
      raise item
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
  flip: bool = False,
  crop: int = 0,
  prefetch: int = 2,
  num_threads: int = _DEFAULT_THREADS,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of local training batches from step ``start_step``; see module doc.

  ``close()`` the iterator (or drop it) to stop its background thread.
  """
  rows = _local_rows(global_batch_size, process_index, process_count)
  n = len(source)
  if n == 0:
    raise ValueError("cannot draw training batches from an empty source.")

  @functools.lru_cache(maxsize=2)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _SHUFFLE, epoch]).permutation(n)

  def make(step, read):
    positions = (step * global_batch_size + np.arange(global_batch_size))[rows]
    indices = [permutation(p // n)[p % n] for p in positions]
    batch = _stack(read(source, indices))
    batch["valid"] = np.ones(len(indices), np.float32)
    if flip or crop:
      batch = _augment(
        batch,
        seed=seed,
        step=step,
        rows=rows,
        global_batch_size=global_batch_size,
        flip=flip,
        crop=crop,
      )
    return batch

  return _Prefetch(make, itertools.count(start_step), prefetch, num_threads)


def eval_batches(
  source,
  global_batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
  num_threads: int = _DEFAULT_THREADS,
) -> Iterator[dict[str, np.ndarray]]:
  """Local evaluation batches in source order, last one padded; see module docstring."""
  rows = _local_rows(global_batch_size, process_index, process_count)
  n = len(source)
  num_batches = -(-n // global_batch_size)
  if n:  # padding rows: zeros shaped like an example, no attack type, no id
    pad = {k: np.zeros_like(v) for k, v in source[0].items() if k != "id"}
    pad.update(attack_type=np.int32(-1), id="")

  def make(step, read):
    positions = (step * global_batch_size + np.arange(global_batch_size))[rows]
    valid = positions < n
    examples = read(source, positions[valid]) + [pad] * int(np.sum(~valid))
    batch = _stack(examples)
    batch["valid"] = valid.astype(np.float32)
    return batch

  return _Prefetch(make, iter(range(num_batches)), prefetch, num_threads)
