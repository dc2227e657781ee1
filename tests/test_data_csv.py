"""CSV-protocol data: round trip, validation errors, map handling, caching, open-set splits."""

import logging
import os

import ml_collections
import numpy as np
import PIL.Image
import pytest

from divisive_jax.data import DataError, load_splits

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
    for i in range(len(source)):
      ex = source[i]
      want_split, label, attack, map_name = EXPECTED[ex["id"]]
      seen.add(ex["id"])
      assert want_split == split
      assert ex["label"] == label == source.label[i]
      assert ex["attack_type"] == (splits.attack_types.index(attack) if attack else -1)
      assert ex["attack_type"] == source.attack_type[i]
      assert ex["image"].dtype == np.float32 and ex["image"].shape == (S, S, channels)
      with PIL.Image.open(dataset / "images" / ex["id"]) as im:
        want = im.convert("L" if channels == 1 else "RGB").resize((S, S), PIL.Image.BILINEAR)
      np.testing.assert_allclose(
        ex["image"] * 255, np.asarray(want).reshape(S, S, channels), atol=1e-3
      )
      if channels == 3 and ex["id"].endswith(("a.png", "d.png", "e.png", "f.png")):
        np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])  # gray source
      assert ex["saliency"].shape == (S, S) and ex["saliency"].dtype == np.float32
      assert ex["has_saliency"] == (map_name is not None) == source.has_saliency[i]
      if map_name is None:
        assert not ex["saliency"].any()
      else:
        with PIL.Image.open(dataset / "maps" / map_name) as im:
          m = np.asarray(im.convert("L").convert("F").resize((S, S), PIL.Image.BILINEAR))
        m = (m - m.min()) / np.ptp(m)
        np.testing.assert_allclose(ex["saliency"], m, atol=0.51 / 255)
        assert ex["saliency"].min() == 0 and ex["saliency"].max() == 1
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
  np.testing.assert_allclose(third.train[0]["image"], 1 - first.train[0]["image"], atol=1.5 / 255)
  # Config fields that change the prepared bytes, and the CSV itself, are in the key.
  assert load(image_size=8).info["prepared_now"]
  csv = dataset / "protocol.csv"
  csv.write_text(csv.read_text().replace("contact/d.png , contact", "contact/d.png , lens"))
  changed = load()
  assert changed.info["prepared_now"]
  assert changed.attack_types == ("contact", "lens", "printout")
