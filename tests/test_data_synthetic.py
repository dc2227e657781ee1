"""Built-in synthetic sets: shortcut geometry and splits; synthetic iris determinism, coverage,
the corner mark (size on the CAM grid, outside the iris map) and its train-only agreement."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage
from helpers import load_config

from divisive_jax import config_base, models
from divisive_jax.data import load_splits, synthetic


def _config(**fields):
  return ml_collections.ConfigDict({"builtin": "synthetic_iris", "seed": 0, **fields})


def _arrays(source):
  """The whole source as one batch (uint8 images and maps, as the source protocol gives)."""
  return source.read(np.arange(len(source)))


@pytest.fixture(scope="module")
def shortcut():
  # num_* and image_size do not apply to the shortcut set.
  splits = load_splits(_config(builtin="shortcut", num_train=7, image_size=64), "")
  data = {s: _arrays(getattr(splits, s)) for s in ("train", "val", "test")}
  for d in data.values():  # binary images and maps, stored as 0 / 255
    assert set(np.unique(d["image"])) == {0, 255} and set(np.unique(d["saliency"])) == {0, 255}
    d["image"], d["saliency"] = d["image"] // 255, d["saliency"] // 255
  return splits, data


def test_shortcut_sizes_and_balance(shortcut):
  splits, data = shortcut
  assert splits.class_names == ("one_cross", "two_crosses") and splits.attack_types == ()
  for split, n in (("train", 500), ("val", 128), ("test", 128)):
    d = data[split]
    assert d["image"].shape == (n, 28, 28, 1) and d["saliency"].shape == (n, 28, 28)
    assert np.sum(d["label"] == 1) == n // 2
    assert set(np.unique(d["image"])) == {0, 1} and set(np.unique(d["saliency"])) == {0, 1}
    assert (d["has_saliency"] == 1).all() and (d["attack_type"] == -1).all()
    assert len(set(d["id"])) == n
  assert splits.info["counts"]["val"] == {
    "total": 128,
    "one_cross": 64,
    "two_crosses": 64,
    "attack_types": {},
  }


def test_shortcut_geometry(shortcut):
  _, data = shortcut
  for split, d in data.items():
    for image, mask, label in zip(d["image"][..., 0], d["saliency"], d["label"]):
      # The image is the crosses (= the map) plus the distractor block and nothing else.
      assert (image >= mask).all()
      distractor = np.argwhere(image - mask)
      cols = synthetic.SHORTCUT_DISTRACTOR_COLS[label if split == "train" else 1 - label]
      assert sorted(map(tuple, distractor)) == [
        (r, c) for r in range(*synthetic.SHORTCUT_DISTRACTOR_ROWS) for c in range(*cols)
      ]
      # label + 1 separate plus signs with arm 1 or 2 (8-connectivity: they do not touch).
      components, count = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
      assert count == label + 1
      for k in range(1, count + 1):
        rows, cols = np.nonzero(components == k)
        d = (rows.max() - rows.min()) // 2
        assert d in (1, 2) and cols.max() - cols.min() == 2 * d and len(rows) == 4 * d + 1
        r, c = rows.min() + d, cols.min() + d
        assert (mask[r - d : r + d + 1, c] == 1).all() and (mask[r, c - d : c + d + 1] == 1).all()


def test_shortcut_seeded():
  make = lambda seed: _arrays(load_splits(_config(builtin="shortcut", seed=seed), "").test)
  a, b, c = make(3), make(3), make(4)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])


def _marked(images):
  """Per image: whether a corner box holds the mark (flat and bright; skin is noisy and darker)."""
  size = images.shape[1]
  boxes = [synthetic.mark_box(size, corner) for corner in range(4)]
  regions = [images[:, t : t + side, left : left + side, 0] for t, left, side in boxes]
  flat = [(r.min((1, 2)) == r.max((1, 2))) & (r.min((1, 2)) >= 0.9 * 255 - 1) for r in regions]
  return np.any(flat, axis=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_iris_seeded_and_covering(channels):
  cfg = _config(image_size=32, channels=channels, num_train=60, num_val=12, num_test=12)
  a, b = load_splits(cfg, ""), load_splits(cfg, "")
  assert a.class_names == ("Live", "Spoof")
  assert a.attack_types == ("printout", "synthetic", "textured_contact")
  assert a.info["description"].startswith("built-in synthetic iris-PAD set (no data paths")
  for split, n in (("train", 60), ("val", 12), ("test", 12)):
    x, y = _arrays(getattr(a, split)), _arrays(getattr(b, split))
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    # Gray: stored with one channel whatever the config (replicated on the device).
    assert getattr(a, split).channels == 1
    assert x["image"].shape == (n, 32, 32, 1) and x["image"].dtype == np.uint8
    assert np.sum(x["label"] == 0) == n // 2
    assert ((x["attack_type"] == -1) == (x["label"] == 0)).all()
    assert set(x["attack_type"][x["label"] == 1]) == {0, 1, 2}
    # The map is the iris: zero in the corners, 1 (255) somewhere.
    assert (x["saliency"][:, :4, :4] == 0).all() and (x["saliency"].max((1, 2)) == 255).all()
  other = _arrays(load_splits(_config(image_size=32, num_train=60, seed=1), "").train)
  assert not np.array_equal(other["image"][..., 0], _arrays(a.train)["image"][..., 0])


def test_synthetic_iris_mark_geometry():
  """The mark is exactly 3 x 3 cells of the quick model's CAM grid, in a corner, and lies
  outside the iris map (with a gap) in every example; `mark` changes nothing else."""
  config = load_config("iris_pad", "quick")
  size, model = config.data.image_size, models.get_model(config.model)
  x = jax.ShapeDtypeStruct((1, size, size, config.data.channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  grid = jax.eval_shape(functools.partial(model.apply, method="features"), variables, x).shape[1]
  cell = size // grid
  assert (size, grid, cell) == (64, 16, 4)
  for corner in range(4):
    top, left, side = synthetic.mark_box(size, corner)
    assert side == 3 * cell and top % cell == 0 and left % cell == 0
    assert top in (0, size - side) and left in (0, size - side)
  assert [synthetic.mark_box(n, 3)[2] for n in (32, 224)] == [6, 42]  # 3/16 of the side
  for n in (32, 64):
    for k in range(150):
      plain, _ = synthetic.iris_example(np.random.default_rng([5, k]), n, None, mark=False)
      marked, saliency = synthetic.iris_example(np.random.default_rng([5, k]), n, None, mark=True)
      changed = plain != marked
      boxes = [synthetic.mark_box(n, corner) for corner in range(4)]
      assert any(
        changed[t : t + side, left : left + side].all() and changed.sum() == side * side
        for t, left, side in boxes
      )
      gap = n // 16  # every corner box and a ring of one CAM cell around it: no iris
      for t, left, side in boxes:
        ring = saliency[max(t - gap, 0) : t + side + gap, max(left - gap, 0) : left + side + gap]
        assert (ring == 0).all()


@pytest.mark.parametrize("agreement", [None, 0.75, 0.5])
def test_synthetic_iris_shortcut_agreement(agreement):
  """Train: exactly round(a n) of the n Spoof and round((1 - a) n) of the n Live examples carry
  the mark (a = config.data.shortcut_agreement, default MARK_AGREEMENT = config_base's); val and
  test: exactly half of each class. Only the marks depend on the agreement."""
  assert synthetic.MARK_AGREEMENT == config_base.base().data.shortcut_agreement == 1.0
  fields = dict(image_size=32, num_train=120, num_val=40, num_test=40)
  extra = {} if agreement is None else {"shortcut_agreement": agreement}
  splits = load_splits(_config(**fields, **extra), "")
  none = load_splits(_config(**fields, shortcut_agreement=0.5), "")
  a = synthetic.MARK_AGREEMENT if agreement is None else agreement
  for split, p in (("train", a), ("val", 0.5), ("test", 0.5)):
    d, control = _arrays(getattr(splits, split)), _arrays(getattr(none, split))
    marked = _marked(d["image"])
    for c, q in ((0, 1 - p), (1, p)):
      assert marked[d["label"] == c].sum() == round(q * np.sum(d["label"] == c)), (split, c)
    for k in ("label", "attack_type", "saliency"):
      np.testing.assert_array_equal(d[k], control[k])
    same = (d["image"] == control["image"])[..., 0]
    boxes = np.zeros(same.shape[1:], bool)
    for t, left, side in (synthetic.mark_box(32, corner) for corner in range(4)):
      boxes[t : t + side, left : left + side] = True
    assert same[:, ~boxes].all()
  with pytest.raises(ValueError, match="shortcut_agreement"):
    load_splits(_config(shortcut_agreement=1.5), "")
