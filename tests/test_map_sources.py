"""Maps without annotators (`data.map_sources`, ``config.data.map_source``): what PCA and LDA
maps highlight, that they fill only the examples without a human map, are cached and computed
again when the training data change, that validation and test pixels never enter, and the
refusals."""

import logging
import os

import ml_collections
import numpy as np
import PIL.Image
import pytest

from divisive_jax import config_base
from divisive_jax.data import describe, load_splits, map_sources, pipeline
from divisive_jax.errors import ConfigError, DataError


class Arrays(pipeline.Source):
  """A training split of given uint8 images (n, H, W, 1); ``has``: which have a (flat) map."""

  def __init__(self, images, labels, has):
    self.images, self.channels = images, 1
    self.label, self.has_saliency = np.asarray(labels), np.asarray(has, np.int32)
    self.attack_type, self.ids = np.full(len(images), -1), np.arange(len(images)).astype(str)

  def read(self, indices):
    idx = np.asarray(indices, np.int64)
    maps = np.where(self.has_saliency[idx, None, None] > 0, 77, 0).astype(np.uint8)
    return self.batch(idx, self.images[idx], np.broadcast_to(maps, (len(idx), 16, 16)).copy())


def _squares(n=40, seed=0):
  """Noise around grey; class 1 (every other image) brighter in the top-left 4x4 square."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 2
  x = 0.5 + 0.05 * rng.standard_normal((n, 16, 16))
  x[labels == 1, :4, :4] += 0.3 * rng.uniform(0.5, 1.5, (int(labels.sum()), 1, 1))
  return np.round(255 * np.clip(x, 0, 1)).astype(np.uint8)[..., None], labels


@pytest.mark.parametrize("source", ["pca", "lda"])
def test_maps_find_where_the_classes_differ(source):
  images, labels = _squares()
  maps = map_sources.compute(images, labels, source)
  assert maps.shape == (40, 16, 16) and maps.dtype == np.uint8 and maps.max() == 255
  inside = maps[labels == 1, :4, :4].mean()
  outside = maps[labels == 1][:, 6:, 6:].mean()
  assert inside > 3 * outside, (inside, outside)
  np.testing.assert_array_equal(maps, map_sources.compute(images, labels, source))  # determinism


def test_only_maps_missing_are_filled_cached_and_recomputed(tmp_path, caplog):
  images, labels = _squares(12)
  has = np.arange(12) < 4  # 4 human maps, 8 missing
  with caplog.at_level(logging.INFO):
    train, info = map_sources.apply(Arrays(images, labels, has), "pca", str(tmp_path))
    assert not caplog.text and not os.listdir(tmp_path)  # nothing computed until a read
    assert np.all(train.read([0, 1])["saliency"] == 77) and not os.listdir(tmp_path)
    batch = train.read(np.arange(12))
  assert "Computed pca maps of 12 training images" in caplog.text
  caplog.clear()
  assert info == {"source": "pca", "human": 4, "withheld": 0, "computed": 8}
  assert np.all(batch["has_saliency"] == 1) and np.all(train.has_saliency == 1)
  assert np.all(batch["saliency"][:4] == 77)  # the human maps stay
  expected = map_sources.compute(images, labels, "pca")
  np.testing.assert_array_equal(batch["saliency"][4:], expected[4:])
  (cached,) = os.listdir(tmp_path)
  with caplog.at_level(logging.INFO):
    again, _ = map_sources.apply(Arrays(images, labels, has), "pca", str(tmp_path))
  assert "Computed pca maps" not in caplog.text  # read from the cache
  np.testing.assert_array_equal(again.read(np.arange(12))["saliency"], batch["saliency"])
  images[5, 0, 0] ^= 1  # the training data changed: computed again, under another key
  map_sources.apply(Arrays(images, labels, has), "pca", str(tmp_path))[0].read([11])
  assert len(os.listdir(tmp_path)) == 2 and cached in os.listdir(tmp_path)


def test_human_map_fraction_withholds_a_seeded_share_of_the_maps(tmp_path):
  images, labels = _squares(12)
  has = np.arange(12) < 10  # 10 human maps
  train, info = map_sources.apply(Arrays(images, labels, has), "human", "", 0.3, seed=5)
  assert info == {"source": "human", "human": 3, "withheld": 7, "computed": 0}
  kept = np.asarray(train.has_saliency)
  assert kept.sum() == 3 and not kept[10:].any()
  batch = train.read(np.arange(12))
  np.testing.assert_array_equal(batch["has_saliency"], kept)
  assert np.all(batch["saliency"][kept > 0] == 77) and not batch["saliency"][kept == 0].any()
  np.testing.assert_array_equal(train.read_maps(np.arange(12)), batch["saliency"])  # maps alone
  again, _ = map_sources.apply(Arrays(images, labels, has), "human", "", 0.3, seed=5)
  np.testing.assert_array_equal(again.has_saliency, kept)  # deterministic in the seed
  other, _ = map_sources.apply(Arrays(images, labels, has), "human", "", 0.3, seed=6)
  assert not np.array_equal(other.has_saliency, kept)
  # At 0 every map is computed: the PCA maps replace the human ones.
  none, info = map_sources.apply(Arrays(images, labels, has), "pca", str(tmp_path), 0.0)
  assert info == {"source": "pca", "human": 0, "withheld": 10, "computed": 12}
  expected = map_sources.compute(images, labels, "pca")
  np.testing.assert_array_equal(none.read(np.arange(12))["saliency"], expected)
  np.testing.assert_array_equal(none.read_maps(np.arange(12)), expected)
  c = config_base.base()
  c.data.update(human_map_fraction=0.25, map_source="pca")
  line = describe(c.data)
  assert "Human maps kept on 0.25 of the training examples" in line and "get pca maps" in line
  c.data.human_map_fraction = 1.5
  with pytest.raises(ConfigError, match=r"human_map_fraction=1.5 must be in \[0, 1\]"):
    config_base.validate(c)


def test_lda_needs_two_classes_and_an_unknown_source_is_refused():
  images, _ = _squares(6)
  with pytest.raises(DataError, match=r"map_source='lda' needs both classes .* Fix: .*=pca"):
    map_sources.apply(Arrays(images, np.zeros(6, int), np.zeros(6)), "lda")
  c = config_base.base()
  c.data.map_source = "eigenfaces"
  with pytest.raises(ConfigError, match="config.data.map_source='eigenfaces' is not valid"):
    config_base.validate(c)


def _csv(root, val_seed):
  """A CSV-protocol set without maps: 8 training images (two classes), 2 val, 2 test."""
  lines = []
  for i in range(12):
    split = "train" if i < 8 else "val" if i < 10 else "test"
    seed = i if split == "train" else 100 * val_seed + i
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), np.uint8)
    PIL.Image.fromarray(pixels).save(os.path.join(root, f"{i}.png"))
    lines.append(f"{split},{['Live', 'Spoof'][i % 2]},{i}.png")
  with open(os.path.join(root, "protocol.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")


def test_validation_and_test_pixels_do_not_change_the_maps(tmp_path):
  maps = []
  for val_seed in (1, 2):
    root = tmp_path / f"d{val_seed}"
    root.mkdir()
    _csv(str(root), val_seed)
    config = ml_collections.ConfigDict(
      dict(csv_path=str(root / "protocol.csv"), image_dir=str(root), map_dir="", map_suffix="")
    )
    config.update(class_names=("Live", "Spoof"), image_size=16, channels=1, seed=0)
    config.update(data_dir=str(root / "prepared"), attack_type_from="none", heldout_attack="")
    config.update(map_source="lda", saliency_control="none")
    splits = load_splits(config, "")
    assert splits.info["map_source"] == {"source": "lda", "human": 0, "withheld": 0, "computed": 8}
    maps.append(splits.train.read(np.arange(8))["saliency"])
    assert not np.any(splits.val.read(np.arange(2))["has_saliency"])  # val keeps none
  np.testing.assert_array_equal(maps[0], maps[1])
  assert maps[0].max() == 255
