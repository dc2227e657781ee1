"""Built-in synthetic sets: shortcut geometry and splits, synthetic iris determinism/coverage."""

import ml_collections
import numpy as np
import pytest
import scipy.ndimage

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


def _has_mark(image):
  """Whether the corner distractor is present: a square much brighter than its surround."""
  size = image.shape[0]
  side, margin = max(2, size // 10), max(1, size // 32)
  for r in (margin, size - side - margin):
    for c in (margin, size - side - margin):
      inner = image[r : r + side, c : c + side].mean()
      outer = image[max(r - margin, 0) : r + side + margin, max(c - margin, 0) : c + side + margin]
      ring = (outer.sum() - inner * side * side) / (outer.size - side * side)
      if inner - ring > 0.2:
        return True
  return False


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


def test_synthetic_iris_distractor():
  """The corner mark lies outside the iris map; it predicts the label in train only."""
  plain, _ = synthetic.iris_example(np.random.default_rng(5), 48, None, mark=False)
  marked, saliency = synthetic.iris_example(np.random.default_rng(5), 48, None, mark=True)
  changed = plain != marked
  assert changed.sum() == (48 // 10) ** 2 and (saliency[changed] == 0).all()
  splits = load_splits(_config(image_size=32, num_train=200, num_val=200, num_test=2), "")
  for split, low, high in (("train", 0.8, 1.0), ("val", 0.35, 0.65)):
    d = _arrays(getattr(splits, split))
    marked = np.array([_has_mark(im[..., 0] / 255) for im in d["image"]])
    agreement = np.mean(marked == (d["label"] == 1))
    assert low <= agreement <= high, (split, agreement)
