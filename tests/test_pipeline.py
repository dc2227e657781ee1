"""Batching: determinism, resumption, process sharding, padded evaluation (augmentation is on
the device: test_preprocess.py)."""

import itertools

import numpy as np
import pytest

from divisive_jax.data import pipeline
from divisive_jax.data.synthetic import ArraySource

N, H, W = 10, 6, 7


@pytest.fixture(scope="module")
def source():
  """Example i: a random image whose map is its own first channel (augmentations must agree)."""
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (N, H, W, 3), dtype=np.uint8)
  return ArraySource(
    images, images[..., 0], np.arange(N) % 2, np.full(N, -1), np.array([f"ex{i}" for i in range(N)])
  )


def _take(it, n):
  return list(itertools.islice(it, n))


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contents(source):
  (batch,) = _take(pipeline.train_batches(source, 4, seed=0), 1)
  assert set(batch) == {"image", "label", "saliency", "has_saliency", "valid", "attack_type", "id"}
  assert batch["image"].shape == (4, H, W, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["valid"].tolist() == [1.0] * 4
  for row, name in enumerate(batch["id"]):
    _equal({k: v[row] for k, v in batch.items() if k != "valid"}, source[int(name[2:])])


def test_deterministic_epochs(source):
  a = _take(pipeline.train_batches(source, 4, seed=1), 10)
  b = _take(pipeline.train_batches(source, 4, seed=1), 10)
  c = _take(pipeline.train_batches(source, 4, seed=2), 10)
  for x, y in zip(a, b):
    _equal(x, y)
  ids = np.concatenate([x["id"] for x in a])
  assert not np.array_equal(ids, np.concatenate([x["id"] for x in c]))
  # Four epochs of 10 in 40 rows: every example once per epoch, a new order each epoch.
  epochs = ids.reshape(4, N)
  assert all(sorted(e) == sorted(source.ids) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 4


def test_resume_equals_continued_stream(source):
  kw = dict(seed=3)
  full = _take(pipeline.train_batches(source, 4, **kw), 8)
  resumed = _take(pipeline.train_batches(source, 4, start_step=5, **kw), 3)
  for x, y in zip(full[5:], resumed):
    _equal(x, y)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_tile_the_global_batch(source, processes):
  kw = dict(seed=4)
  glob = _take(pipeline.train_batches(source, 8, **kw), 4)
  local = [
    _take(pipeline.train_batches(source, 8, process_index=p, process_count=processes, **kw), 4)
    for p in range(processes)
  ]
  for step, g in enumerate(glob):
    assert all(len(local[p][step]["id"]) == 8 // processes for p in range(processes))
    _equal(g, {k: np.concatenate([local[p][step][k] for p in range(processes)]) for k in g})


def test_global_batch_must_divide(source):
  with pytest.raises(ValueError, match="divisible by the process count 3"):
    pipeline.train_batches(source, 8, seed=0, process_count=3)
  with pytest.raises(ValueError, match="divisible by the process count 3"):
    pipeline.eval_batches(source, 8, process_count=3)


@pytest.mark.parametrize("batch,processes", [(4, 1), (4, 2), (8, 4), (16, 2)])
def test_eval_visits_each_example_once(source, batch, processes):
  per_process = [
    list(pipeline.eval_batches(source, batch, process_index=p, process_count=processes))
    for p in range(processes)
  ]
  assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == -(-N // batch)
  rows = [b for batches in zip(*per_process) for b in batches]  # global order
  ids = np.concatenate([b["id"] for b in rows])
  valid = np.concatenate([b["valid"] for b in rows])
  assert ids[valid == 1].tolist() == list(source.ids)  # in order, each once
  assert (valid[:N] == 1).all() and (valid[N:] == 0).all()
  for b in rows:
    pad = b["valid"] == 0
    assert not b["image"][pad].any() and not b["has_saliency"][pad].any()
    assert b["image"].dtype == np.uint8
    assert (b["attack_type"][pad] == -1).all() and (b["id"][pad] == "").all()


def test_batch_indices_are_the_stream():
  """The device-resident path indexes the source with `batch_indices`: the same batches."""
  n, b = 10, 4
  src = ArraySource(
    np.zeros((n, 2, 2, 1), np.uint8),
    np.zeros((n, 2, 2), np.uint8),
    np.zeros(n),
    np.full(n, -1),
    np.array([f"ex{i}" for i in range(n)]),
  )
  stream = _take(pipeline.train_batches(src, b, seed=7), 6)
  for k, batch in enumerate(stream):
    want = [f"ex{i}" for i in pipeline.batch_indices(n, b, 7, k)]
    assert batch["id"].tolist() == want


def test_errors_reach_the_consumer():
  class Broken:
    def __len__(self):
      return 3

    def read(self, indices):
      raise RuntimeError(f"cannot read {list(indices)}")

  with pytest.raises(RuntimeError, match="cannot read"):
    next(pipeline.train_batches(Broken(), 2, seed=0))
