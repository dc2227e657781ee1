"""CSV-protocol data: round trip, batched reads, stored channels, validation errors, map
handling, caching (and format upgrades), open-set splits."""

import logging
import os
import shutil

import ml_collections
import numpy as np
import PIL.Image
import pytest

from divisive_jax.data import csv_dataset, load_splits
from divisive_jax.errors import DataError
from divisive_jax.data.csv_dataset import to_model_image

S = 16  # image_size of the prepared data


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(array).save(path)


def _smooth(h, w, seed, channels=None):
  """A smooth random uint8 image, so resizing is well defined (no aliasing)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  shape = (h, w) if channels is None else (h, w, channels)
  phase = rng.uniform(0, 6, (channels or 1,))
  out = 127 + 100 * np.sin(3 * xx[..., None] + 2 * yy[..., None] + phase)
  return np.clip(out.reshape(shape), 0, 255).astype(np.uint8)


def _config(tmp_path, **overrides):
  cfg = ml_collections.ConfigDict(
    dict(
      csv_path=str(tmp_path / "protocol.csv"),
      image_dir=str(tmp_path / "images"),
      map_dir=str(tmp_path / "maps"),
      class_names=("Live", "Spoof"),
      map_suffix="_blended",
      image_size=S,
      channels=1,
      data_dir=str(tmp_path / "prepared"),
      attack_type_from="column",
      heldout_attack="",
    )
  )
  cfg.update(overrides)
  return cfg


def _write_csv(tmp_path, lines):
  (tmp_path / "protocol.csv").write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def dataset(tmp_path):
  """Gray/RGB PNG/JPG images of different sizes; maps with suffix for some of them."""
  img, maps = str(tmp_path / "images"), str(tmp_path / "maps")
  _save(f"{img}/live/a.png", _smooth(20, 16, 0))  # gray PNG, map at 2x size
  _save(f"{maps}/a_blended.png", _smooth(40, 32, 1))
  _save(f"{img}/live/b.jpg", _smooth(24, 24, 2, channels=3))  # RGB JPG, no map
  _save(f"{img}/print/c.png", _smooth(12, 18, 3, channels=3))  # RGB PNG, JPG map
  _save(f"{maps}/c_blended.JPG", _smooth(24, 36, 4, channels=3))
  _save(f"{img}/contact/d.png", _smooth(16, 16, 5))
  _save(f"{maps}/d_blended.bmp", _smooth(8, 8, 6))
  _save(f"{img}/print/e.png", _smooth(16, 16, 7))
  _save(f"{img}/live/f.png", _smooth(16, 16, 8))
  _save(f"{maps}/f.png", _smooth(16, 16, 9))  # no suffix: must not match
  _save(f"{img}/contact/d2.png", _smooth(16, 16, 10))
  _write_csv(
    tmp_path,
    [
      "train,Live,live/a.png",
      "train,Spoof,print/c.png,printout",
      "train, Spoof , contact/d.png , contact",
      "",
      "val,Live,live/b.jpg",
      "val,Spoof,print/e.png,printout",
      "test,Live,live/f.png",
      "test,Spoof,contact/d2.png,contact",
    ],
  )
  return tmp_path


EXPECTED = {  # id -> (split, label, attack type name, map file or None)
  "live/a.png": ("train", 0, None, "a_blended.png"),
  "print/c.png": ("train", 1, "printout", "c_blended.JPG"),
  "contact/d.png": ("train", 1, "contact", "d_blended.bmp"),
  "live/b.jpg": ("val", 0, None, None),
  "print/e.png": ("val", 1, "printout", None),
  "live/f.png": ("test", 0, None, None),
  "contact/d2.png": ("test", 1, "contact", None),
}


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip(dataset, channels):
  splits = load_splits(_config(dataset, channels=channels), str(dataset))
  assert splits.class_names == ("Live", "Spoof")
  assert splits.attack_types == ("contact", "printout")
  seen = set()
  for split in ("train", "val", "test"):
    source = getattr(splits, split)
    batch = source.read(np.arange(len(source)))
    for i in range(len(source)):
      ex = {key: column[i] for key, column in batch.items()}
      want_split, label, attack, map_name = EXPECTED[ex["id"]]
      seen.add(ex["id"])
      assert want_split == split
      assert ex["label"] == label == source.label[i]
      assert ex["attack_type"] == (splits.attack_types.index(attack) if attack else -1)
      assert ex["attack_type"] == source.attack_type[i] and ex["id"] == source.ids[i]
      # Mixed gray and RGB files: stored with `channels` channels (gray ones replicated).
      assert source.channels == channels
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == (S, S, channels)
      with PIL.Image.open(dataset / "images" / ex["id"]) as im:
        want = im.convert("L" if channels == 1 else "RGB").resize((S, S), PIL.Image.BILINEAR)
      np.testing.assert_array_equal(ex["image"], np.asarray(want).reshape(S, S, channels))
      if channels == 3 and ex["id"].endswith(("a.png", "d.png", "e.png", "f.png")):
        np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])  # gray source
      assert ex["saliency"].shape == (S, S) and ex["saliency"].dtype == np.uint8
      assert ex["has_saliency"] == (map_name is not None) == source.has_saliency[i]
      assert ex["has_saliency"].dtype == np.float32 and ex["label"].dtype == np.int32
      if map_name is None:
        assert not ex["saliency"].any()
      else:
        with PIL.Image.open(dataset / "maps" / map_name) as im:
          m = np.asarray(im.convert("L").convert("F").resize((S, S), PIL.Image.BILINEAR))
        m = (m - m.min()) / np.ptp(m)
        # uint8 maps: the min-max normalised map quantised to 1/255 (rounded).
        np.testing.assert_allclose(ex["saliency"] / 255, m, atol=0.51 / 255)
        assert ex["saliency"].min() == 0 and ex["saliency"].max() == 255
  assert seen == set(EXPECTED)
  info = splits.info
  assert info["description"] == f"CSV protocol data from {dataset / 'protocol.csv'}"
  assert info["counts"]["train"] == {
    "total": 3,
    "Live": 1,
    "Spoof": 2,
    "attack_types": {"contact": 1, "printout": 1},
  }
  assert info["map_coverage"] == {"train": 1.0, "val": 0.0, "test": 0.0}
  assert info["skipped"] == [{"item": f"{dataset / 'protocol.csv'}:4", "reason": "blank line"}]


def test_read_a_batch_equals_the_rows(dataset):
  from array_record.python import array_record_module

  splits = load_splits(_config(dataset, channels=3), str(dataset))
  keys = ("image", "saliency", "label", "has_saliency", "attack_type", "id")
  dtypes = (np.uint8, np.uint8, np.int32, np.float32, np.int32, np.str_)
  for source in (splits.train, splits.val, splits.test):
    n = len(source)
    assert list(source.ids) == [source[i]["id"] for i in range(n)]
    indices = [n - 1, 0, n - 1, -1] + list(range(n))  # any order, repeats, negative
    batch = source.read(np.array(indices))
    assert sorted(batch) == sorted(keys)
    for key, dtype in zip(keys, dtypes):
      assert batch[key].dtype.type == dtype and len(batch[key]) == len(indices)
      np.testing.assert_array_equal(batch[key], np.stack([source[i][key] for i in indices]))
    empty = source.read([])
    assert empty["image"].shape == (0, S, S, 3) and empty["saliency"].shape == (0, S, S)
    assert all(len(v) == 0 for v in empty.values())
    with pytest.raises(IndexError):
      source.read([n])
  # Stored uncompressed (tfds' own writer uses zstd; the shards are rewritten after it).
  info = splits.info
  (path,) = [f for f in os.listdir(info["prepared_dir"]) if "train.array_record" in f]
  reader = array_record_module.ArrayRecordReader(os.path.join(info["prepared_dir"], path))
  assert "uncompressed" in reader.writer_options_string()
  reader.close()


def test_gray_images_are_stored_with_one_channel(dataset):
  """A protocol of single-channel files (8-bit, 16-bit, float) is stored with one channel even
  with channels=3 (the device replicates it); one RGB file makes it three."""
  g = _smooth(23, 17, 12)
  _save(str(dataset / "images/live/g16.png"), g.astype(np.uint16) * 250)  # real 16-bit data
  _save(str(dataset / "images/live/h.tif"), _smooth(20, 26, 14).astype(np.float32) / 255)
  rows = ["train,Live,live/a.png", "train,Live,live/g16.png", "val,Live,live/h.tif"]
  _write_csv(dataset, rows + ["test,Live,live/f.png"])
  gray = load_splits(_config(dataset, channels=3), str(dataset))
  assert gray.info["stored_channels"] == 1
  for split in ("train", "val", "test"):
    source = getattr(gray, split)
    assert source.channels == 1 and source.read([0])["image"].shape == (1, S, S, 1)
    for i in range(len(source)):
      with PIL.Image.open(dataset / "images" / source[i]["id"]) as im:
        want = to_model_image(im, S, 3)  # what the model sees: replicated on the device
      np.testing.assert_array_equal(np.repeat(source[i]["image"], 3, axis=-1), want)
  again = load_splits(_config(dataset, channels=3), str(dataset))  # cache hit: same layout
  assert not again.info["prepared_now"] and again.train.channels == 1
  np.testing.assert_array_equal(again.train.read([0, 1])["image"], gray.train.read([0, 1])["image"])
  _write_csv(dataset, rows + ["test,Live,live/b.jpg"])  # one RGB image
  mixed = load_splits(_config(dataset, channels=3), str(dataset))
  assert mixed.train.channels == mixed.test.channels == 3
  assert mixed.info["stored_channels"] == 3
  assert load_splits(_config(dataset, channels=1), str(dataset)).test.channels == 1


def test_cache_of_an_older_format_is_prepared_again(dataset, caplog, monkeypatch):
  load = lambda: load_splits(_config(dataset), str(dataset))
  monkeypatch.setattr(csv_dataset, "_FORMAT_VERSION", "1.1.0")
  old = load()
  assert old.info["prepared_dir"].endswith("/1.1.0") and old.info["prepared_now"]
  monkeypatch.undo()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    new = load()
  assert new.info["prepared_now"] and new.info["prepared_dir"].endswith("/2.0.0")
  assert new.info["fingerprint"] == old.info["fingerprint"]
  folder = os.path.dirname(new.info["prepared_dir"])
  want = (
    f"Prepared data in {folder} were written in format 1.1.0 (PNG); preparing them again as "
    "2.0.0 (uint8 arrays)"
  )
  messages = [r.getMessage() for r in caplog.records]
  assert messages.count(want) == 1
  assert [m for m in messages if "1.1.0" in m] == [want]  # nothing else about the old copy
  np.testing.assert_array_equal(
    new.train.read([0, 1, 2])["image"], old.train.read([0, 1, 2])["image"]
  )
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert not load().info["prepared_now"]  # then a plain cache hit, without the message
  assert not [r for r in caplog.records if "preparing them again" in r.getMessage()]


def test_attack_type_from_path(dataset):
  _save(str(dataset / "images/x.png"), _smooth(16, 16, 11))
  _write_csv(
    dataset,
    [
      "train,Live,live/a.png",
      "train,Spoof,print/c.png",
      "val,Spoof,contact/d.png",
      "test,Spoof,print/e.png",
      "test,Spoof,x.png",
    ],
  )
  splits = load_splits(_config(dataset, attack_type_from="path"), str(dataset))
  assert splits.attack_types == ("contact", "print")
  assert list(splits.train.attack_type) == [-1, 1]
  assert list(splits.test.attack_type) == [1, -1]  # 'x.png' has no directory: unknown
  assert [h["item"] for h in splits.info["handled"]] == [f"{dataset / 'protocol.csv'}:5 (x.png)"]


def test_open_set_membership(dataset):
  splits = load_splits(_config(dataset, heldout_attack="printout"), str(dataset))
  ids = lambda s: sorted(s[i]["id"] for i in range(len(s)))
  assert ids(splits.train) == ["contact/d.png", "live/a.png"]
  assert ids(splits.val) == ["live/b.jpg"]
  # bona fide test + every 'printout' example of every split; seen 'contact' leaves test.
  assert ids(splits.test) == ["live/f.png", "print/c.png", "print/e.png"]
  assert splits.info["counts"]["test"]["attack_types"] == {"contact": 0, "printout": 2}
  assert "printout" in splits.info["protocol"]
  with pytest.raises(DataError, match="'postmortem' is not an attack type"):
    load_splits(_config(dataset, heldout_attack="postmortem"), str(dataset))


BAD_ROWS = [  # (row replacing line 2, message fragment)
  (
    "train,Live,live/missing.png",
    r"line 2, field 3 \(relative_path\): image .*missing.png not found",
  ),
  (
    "train,Fake,live/a.png",
    "line 2, field 2 .*add 'Fake' to --config.data.class_names or fix line 2",
  ),
  ("train,Live", "line 2, whole row: 2 columns"),
  ("train,Live,live/a.png,x,y", "line 2, whole row: 5 columns"),
  ("training,Live,live/a.png", "line 2, field 1 \\(split\\): unknown split 'training'"),
  ("train,Spoof,print/c.png,printout", "line 2.*already listed on line 1"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows(dataset, row, message):
  _write_csv(
    dataset,
    ["train,Spoof,print/c.png,printout", row, "val,Live,live/b.jpg", "test,Live,live/f.png"],
  )
  with pytest.raises(DataError, match=message) as e:
    load_splits(_config(dataset), str(dataset))
  assert str(dataset / "protocol.csv") in str(e.value) and "Fix:" in str(e.value)


def test_fourth_column_needs_attack_type_from_column(dataset):
  with pytest.raises(DataError, match="line 2, whole row: 4 columns.*attack_type_from=column"):
    load_splits(_config(dataset, attack_type_from="none"), str(dataset))


def test_empty_csv_and_missing_split(dataset):
  _write_csv(dataset, [])
  with pytest.raises(DataError, match=r"protocol.csv, line 1: the file has no example rows"):
    load_splits(_config(dataset), str(dataset))
  _write_csv(dataset, ["train,Live,live/a.png", "test,Live,live/f.png"])
  with pytest.raises(DataError, match="protocol.csv has no 'val' rows"):
    load_splits(_config(dataset), str(dataset))


def test_unreadable_image(dataset):
  (dataset / "images/live/b.jpg").write_bytes(b"not an image")
  with pytest.raises(DataError, match=r"line 5, field 3 .*cannot read image .*b.jpg"):
    load_splits(_config(dataset), str(dataset))


def test_map_aspect_mismatch(dataset):
  _save(str(dataset / "maps/a_blended.png"), _smooth(10, 32, 1))  # image is 16x20 (w x h)
  with pytest.raises(
    DataError,
    match=r"line 1.*map .*a_blended.png \(32x10\) and image "
    r".*a.png \(16x20\)",
  ):
    load_splits(_config(dataset), str(dataset))


def test_ambiguous_map(dataset):
  _save(str(dataset / "maps/a_blended.jpg"), _smooth(40, 32, 1))
  with pytest.raises(DataError, match="line 1.*several maps match"):
    load_splits(_config(dataset), str(dataset))


def test_constant_map_is_handled(dataset, caplog):
  _save(str(dataset / "maps/a_blended.png"), np.zeros((40, 32), np.uint8))
  with caplog.at_level(logging.WARNING):
    splits = load_splits(_config(dataset), str(dataset))
  assert splits.train[0]["id"] == "live/a.png"
  assert splits.train[0]["has_saliency"] == 0 and splits.train.has_saliency[0] == 0
  assert not splits.train[0]["saliency"].any()
  handled = [h for h in splits.info["handled"] if h["item"].endswith("a_blended.png")]
  assert len(handled) == 1 and "constant map" in handled[0]["reason"]
  assert any("a_blended.png" in r.getMessage() for r in caplog.records)
  assert splits.info["map_coverage"]["train"] == pytest.approx(2 / 3)
  # The cached copy reports the same handling without re-reading the maps.
  again = load_splits(_config(dataset), str(dataset))
  assert not again.info["prepared_now"] and again.info["handled"] == splits.info["handled"]


def test_cache_reused_and_invalidated(dataset):
  load = lambda **kw: load_splits(_config(dataset, **kw), str(dataset))
  first = load()
  assert first.info["prepared_now"]
  second = load()
  assert not second.info["prepared_now"]
  assert second.info["prepared_dir"] == first.info["prepared_dir"]
  # A changed image (new content and mtime) is picked up.
  path = dataset / "images/live/a.png"
  _save(str(path), 255 - _smooth(20, 16, 0))
  os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
  third = load()
  assert third.info["prepared_now"]
  assert third.info["fingerprint"] != first.info["fingerprint"]
  inverse = 255 - first.train[0]["image"].astype(np.int16)
  np.testing.assert_allclose(third.train[0]["image"], inverse, atol=1)
  # Config fields that change the prepared bytes, and the CSV itself, are in the key.
  assert load(image_size=8).info["prepared_now"]
  csv = dataset / "protocol.csv"
  csv.write_text(csv.read_text().replace("contact/d.png , contact", "contact/d.png , lens"))
  changed = load()
  assert changed.info["prepared_now"]
  assert changed.attack_types == ("contact", "lens", "printout")


# ---------------------------------------------------------------- 16-bit and float images
def _resize_f(x, size=S):
  """Float bilinear resize (PIL mode 'F'), as the data layer resizes high-depth images."""
  return np.asarray(
    PIL.Image.fromarray(x.astype(np.float32), "F").resize((size, size), PIL.Image.BILINEAR)
  )


def _gray_rows(*paths):
  """Rows for ``paths`` (train, Live) plus the fixture's val and test rows."""
  return [f"train,Live,{p}" for p in paths] + ["val,Live,live/b.jpg", "test,Live,live/f.png"]


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_image_equals_its_8_bit_twin(dataset, channels):
  g = _smooth(23, 17, 12)
  _save(str(dataset / "images/live/g8.png"), g)
  _save(str(dataset / "images/live/g16.png"), g.astype(np.uint16) * 257)
  with PIL.Image.open(dataset / "images/live/g16.png") as im:
    assert im.mode == "I;16"
  _write_csv(dataset, _gray_rows("live/g8.png", "live/g16.png"))
  splits = load_splits(_config(dataset, channels=channels), str(dataset))
  eight, sixteen = splits.train[0]["image"], splits.train[1]["image"]
  assert sixteen.shape == (S, S, channels) and 0.2 * 255 < eight.mean() < 0.8 * 255
  np.testing.assert_array_equal(sixteen, eight)
  if channels == 3:
    np.testing.assert_array_equal(sixteen[..., 0], sixteen[..., 2])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16_bit_image_keeps_its_range(mode):
  """Real 16-bit content (12-bit values here): scaled by 1/65535, resized in float, rounded."""
  v = (_smooth(21, 30, 13).astype(np.int64) * 16 + 7).astype(np.uint16)  # 7..4047
  if mode == "I":
    im = PIL.Image.fromarray(v.astype(np.int32))
  else:
    im = PIL.Image.frombytes(mode, (30, 21), v.astype(">u2" if mode == "I;16B" else "<u2"))
  assert im.mode == mode
  want = np.round(_resize_f(v / 65535) * 255)
  for channels in (1, 3):
    got = to_model_image(im, S, channels)
    assert got.dtype == np.uint8 and got.shape == ((S, S) if channels == 1 else (S, S, 3))
    np.testing.assert_array_equal(got.reshape(S, S, channels), want[..., None].repeat(channels, 2))
  assert want.max() < 20  # dark, as the data are: nothing clipped to white


def test_32_bit_int_image_out_of_16_bit_range_is_an_error(tmp_path):
  path = str(tmp_path / "deep.tif")
  PIL.Image.fromarray(np.arange(200, dtype=np.int32).reshape(10, 20) * 1000).save(path)
  with PIL.Image.open(path) as im:
    with pytest.raises(
      DataError, match=r"deep.tif: .*values 0\.\.199000.*Fix: save it as an 8- or"
    ):
      to_model_image(im, S, 1, path)


def test_float_tiff_in_unit_range(dataset):
  x = _smooth(20, 26, 14).astype(np.float32) / 255 + np.float32(0.001)
  _save(str(dataset / "images/live/h.tif"), x)
  with PIL.Image.open(dataset / "images/live/h.tif") as im:
    assert im.mode == "F"
  _write_csv(dataset, _gray_rows("live/h.tif"))
  image = load_splits(_config(dataset), str(dataset)).train[0]["image"]
  np.testing.assert_array_equal(image[..., 0], np.round(_resize_f(x) * 255))


def test_float_tiff_out_of_range_is_an_error(dataset):
  x = _smooth(20, 26, 14).astype(np.float32)
  x[0, 0] = 300
  _save(str(dataset / "images/live/h.tif"), x)
  _write_csv(dataset, _gray_rows("live/a.png", "live/h.tif"))
  with pytest.raises(
    DataError,
    match=r"protocol.csv, line 2, field 3 \(relative_path\): .*live/h.tif: float image .*"
    r"values \S+\.\.300 not in \[0, 1\].*Fix: ",
  ):
    load_splits(_config(dataset), str(dataset))
  with PIL.Image.open(dataset / "images/live/h.tif") as im:  # explain.py: a ValueError
    with pytest.raises(ValueError, match=r"^image \(mode F\): float image"):
      to_model_image(im, S, 3)


# ------------------------------------------------------------------------- map matching
def _expected_map(path):
  with PIL.Image.open(path) as im:
    m = np.asarray(im.convert("L").convert("F").resize((S, S), PIL.Image.BILINEAR))
  return (m - m.min()) / np.ptp(m)


def _fresh_maps(dataset, maps):
  """Replaces the fixture's maps by ``maps``: {path relative to map_dir: seed}."""
  shutil.rmtree(dataset / "maps")
  (dataset / "maps").mkdir()
  for rel, seed in maps.items():
    _save(str(dataset / "maps" / rel), _smooth(20, 16, seed))


def test_maps_matched_by_relative_path(dataset):
  """Same file name in two folders: each image gets the map of its own relative folder; an
  image whose name has maps only in other images' folders gets none."""
  for folder in ("live", "print", "contact"):
    _save(str(dataset / f"images/{folder}/x.png"), _smooth(20, 16, 20))
  _fresh_maps(
    dataset, {"live/x_blended.png": 21, "print/x_blended.PNG": 22, "sub/e_blended.jpg": 23}
  )
  _write_csv(
    dataset,
    [
      "train,Live,live/x.png",
      "train,Spoof,print/x.png,printout",
      "train,Spoof,print/e.png,printout",  # fallback: the only e_blended.* under map_dir
      "val,Spoof,contact/x.png,contact",
      "test,Live,live/f.png",
    ],
  )
  splits = load_splits(_config(dataset), str(dataset))
  for i, rel in enumerate(["live/x_blended.png", "print/x_blended.PNG", "sub/e_blended.jpg"]):
    assert splits.train[i]["has_saliency"] == 1
    want = _expected_map(dataset / "maps" / rel)
    np.testing.assert_allclose(splits.train[i]["saliency"] / 255, want, atol=0.51 / 255)
  assert splits.val[0]["has_saliency"] == 0 and splits.test[0]["has_saliency"] == 0
  assert splits.info["unmatched_maps"] == []


def test_flat_map_shared_by_two_images_is_an_error(dataset):
  _save(str(dataset / "images/print/a.png"), _smooth(20, 16, 24))
  _write_csv(
    dataset, ["train,Live,live/a.png", "val,Spoof,print/a.png,printout"] + _gray_rows()[1:]
  )
  with pytest.raises(
    DataError,
    match=r"protocol.csv, line 2, field 3 \(relative_path\): 'print/a.png' and 'live/a.png' "
    r"\(line 1\) would share the map a_blended.png.*Fix: .*same relative folders",
  ):
    load_splits(_config(dataset), str(dataset))


def test_same_stem_in_one_folder_is_an_error(dataset):
  _save(str(dataset / "images/live/a.jpg"), _smooth(20, 16, 25))
  _write_csv(dataset, _gray_rows("live/a.png", "live/a.jpg"))
  with pytest.raises(DataError, match=r"line 2.*'live/a.jpg' and 'live/a.png' \(line 1\) would"):
    load_splits(_config(dataset), str(dataset))


@pytest.mark.parametrize(
  "maps,line,image",
  [
    ({"p/a_blended.png": 1, "q/a_blended.png": 2}, 1, "print/a.png"),  # two in other folders
    ({"print/a_blended.png": 1, "a_blended.png": 2}, 2, "live/a.png"),  # a stale flat copy
  ],
)
def test_several_maps_of_one_name_are_an_error(dataset, maps, line, image):
  _save(str(dataset / "images/print/a.png"), _smooth(20, 16, 24))
  _fresh_maps(dataset, maps)
  _write_csv(dataset, _gray_rows("print/a.png", "live/a.png"))
  with pytest.raises(
    DataError, match=rf"line {line}, .*several maps match '{image}' by file name.*Fix: put"
  ):
    load_splits(_config(dataset), str(dataset))


# --------------------------------------------------------------------- unmatched maps
def _unmatched_warnings(caplog):
  return [r.getMessage() for r in caplog.records if "match no CSV image" in r.getMessage()]


def test_unmatched_maps_are_reported(dataset, caplog):
  with caplog.at_level(logging.WARNING):
    splits = load_splits(_config(dataset), str(dataset))
  info = splits.info
  assert info["unmatched_maps"] == ["f.png"] and info["unmatched_maps_count"] == 1
  assert info["unmatched_maps_causes"] == {"map_suffix": 1}
  (message,) = _unmatched_warnings(caplog)
  assert "1 of 4 map files" in message and "f.png" in message and "live/f.png" in message
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # a cache hit reports them too
    again = load_splits(_config(dataset), str(dataset))
  assert not again.info["prepared_now"]
  assert again.info["unmatched_maps"] == ["f.png"] and len(_unmatched_warnings(caplog)) == 1


@pytest.mark.parametrize(
  "layout,suffix,cause,phrase",
  [
    ("N{i}_blended.png", "_blended", "case mismatch", "upper/lower case"),
    ("n{i}_blended.png", "_map", "map_suffix", "these maps suggest '_blended'"),
    ("old/n{i}_blended.png", "_blended", "different folder", "another folder"),
  ],
)
def test_many_unmatched_maps_warn_once_with_the_cause(
  dataset, caplog, layout, suffix, cause, phrase
):
  maps = {f"live/n{i}_blended.png": i for i in range(8)} if cause == "different folder" else {}
  maps.update({layout.format(i=i): i for i in range(8)})
  _fresh_maps(dataset, maps)
  for i in range(8):
    _save(str(dataset / f"images/live/n{i}.png"), _smooth(20, 16, i))
  _write_csv(dataset, _gray_rows(*(f"live/n{i}.png" for i in range(8))))
  with caplog.at_level(logging.WARNING):
    splits = load_splits(_config(dataset, map_suffix=suffix), str(dataset))
  assert splits.info["unmatched_maps_count"] == 8
  assert splits.info["unmatched_maps_causes"] == {cause: 8}
  (message,) = _unmatched_warnings(caplog)
  assert "8 of" in message and phrase in message


def test_unmatched_map_list_is_capped(dataset):
  _fresh_maps(dataset, {f"zz/z{i:03d}_blended.png": 0 for i in range(105)})
  info = load_splits(_config(dataset), str(dataset)).info
  assert info["unmatched_maps_count"] == 105 and len(info["unmatched_maps"]) == 100
  assert info["unmatched_maps"][0] == "zz/z000_blended.png"
  assert info["unmatched_maps_causes"] == {"no image": 105}


def test_map_dir_without_map_files_warns(dataset, caplog):
  _fresh_maps(dataset, {})
  (dataset / "maps/a_blended.npy").write_bytes(b"not a map format")
  with caplog.at_level(logging.WARNING):
    splits = load_splits(_config(dataset), str(dataset))
  assert not splits.train.has_saliency.any() and splits.info["unmatched_maps_count"] == 0
  assert any("no map files under" in r.getMessage() for r in caplog.records)


def test_16_bit_map_keeps_its_range(dataset):
  """A big-endian 16-bit map (mode I;16B) is min-max normalised, not clipped to 8 bits."""
  m = _smooth(20, 16, 31).astype(np.uint16) * 4
  PIL.Image.fromarray(m.astype(">u2")).save(dataset / "maps/a_blended.tif")
  (dataset / "maps/a_blended.png").unlink()
  with PIL.Image.open(dataset / "maps/a_blended.tif") as im:
    assert im.mode == "I;16B"
  saliency = load_splits(_config(dataset), str(dataset)).train[0]["saliency"]
  want = _resize_f(m.astype(np.float32))
  np.testing.assert_allclose(saliency / 255, (want - want.min()) / np.ptp(want), atol=0.51 / 255)


# ------------------------------------------------------------------- path normalisation
@pytest.mark.parametrize(
  "spelling", ["./print/c.png", "print//c.png", "print/../print/c.png", "ABS", "print/link.png"]
)
def test_same_file_spelled_differently_is_a_duplicate(dataset, spelling):
  os.symlink(dataset / "images/print/c.png", dataset / "images/print/link.png")
  spelling = str(dataset / "images/print/c.png") if spelling == "ABS" else spelling
  _write_csv(
    dataset,
    [
      "train,Spoof,print/c.png,printout",
      f"test,Spoof,{spelling},printout",
      "val,Live,live/b.jpg",
      "test,Live,live/f.png",
    ],
  )
  with pytest.raises(
    DataError,
    match=r"line 2, field 3 \(relative_path\): .* already listed on line 1, in two splits "
    r"\(train and test\): this leaks test data into training. Fix: list each image once",
  ):
    load_splits(_config(dataset), str(dataset))


def test_ids_are_normalised(dataset, tmp_path_factory):
  outside = tmp_path_factory.mktemp("outside") / "o.png"
  _save(str(outside), _smooth(16, 16, 30))
  _write_csv(
    dataset,
    [
      "train,Live,./live/a.png",
      f"train,Spoof,{dataset / 'images/print/c.png'}",
      "val,Spoof,contact//d.png",
      f"test,Live,{outside}",
      "test,Spoof,print/../print/e.png",
    ],
  )
  splits = load_splits(_config(dataset, attack_type_from="path"), str(dataset))
  ids = lambda s: [s[i]["id"] for i in range(len(s))]
  assert ids(splits.train) == ["live/a.png", "print/c.png"]
  assert ids(splits.val) == ["contact/d.png"] and ids(splits.test) == [str(outside), "print/e.png"]
  assert splits.attack_types == ("contact", "print")
  assert list(splits.train.has_saliency) == [1, 1]  # the maps of a.png and c.png are found


def test_transparent_and_animated_images_are_errors(dataset):
  """An image with transparent pixels would show the model the colours hidden under them (here
  pure red), an animated one only its first frame: both stop with the file and the fix; an
  opaque alpha channel loses nothing and is dropped; a map with transparency is refused too."""
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 255, 255
  rgba[4:12, 4:12, 3] = 0  # transparent, hiding red
  _save(str(dataset / "images/print/e.png"), rgba)
  with pytest.raises(
    DataError, match=r"line 6, field 3 .*e.png has 64 transparent pixels of 256 .*Fix: flatten"
  ):
    load_splits(_config(dataset), str(dataset))
  rgba[..., 3] = 255  # opaque: the RGB image itself
  _save(str(dataset / "images/print/e.png"), rgba)
  e = load_splits(_config(dataset, channels=3), str(dataset)).val[1]["image"]
  np.testing.assert_array_equal(e[..., 0], 255)
  frames = [PIL.Image.fromarray(_smooth(16, 16, k)) for k in range(3)]
  frames[0].save(dataset / "images/print/e.gif", save_all=True, append_images=frames[1:])
  _write_csv(dataset, _gray_rows("live/a.png", "print/e.gif"))
  with pytest.raises(DataError, match=r"line 2, .*e.gif is animated \(3 frames\).*Fix: save"):
    load_splits(_config(dataset), str(dataset))
  la = np.zeros((40, 32, 2), np.uint8)
  la[..., 0] = _smooth(40, 32, 1)
  la[:20, :, 1] = 255  # the lower half transparent
  _save(str(dataset / "maps/a_blended.png"), la)
  _write_csv(dataset, _gray_rows("live/a.png"))
  with pytest.raises(DataError, match=r"line 1, .*map .*a_blended.png has 640 transparent"):
    load_splits(_config(dataset), str(dataset))
