"""explain.py: panels, ranking by divergence energy, per-class mean maps (checked against CAMs
computed here from the model's features and head weights), image folders, errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from divisive_jax.data import image_files
from divisive_jax.errors import UserError
from divisive_jax.evaluators.divergence import safe_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_evaluate import ROOT, tiny_config, trained_workdir  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory)


def _ranking(out):
  with open(os.path.join(out, "ranking.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _odd_images(folder):
  """Odd-sized RGB PNG, gray JPG, RGBA PNG (in a subfolder) and a non-image file."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
  PIL.Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(
    os.path.join(folder, "rgb odd.png")
  )
  PIL.Image.fromarray(rng.integers(0, 256, (120, 91), dtype=np.uint8)).save(
    os.path.join(folder, "gray.jpg")
  )
  rgba = rng.integers(0, 256, (23, 23, 4), dtype=np.uint8)
  rgba[..., 3] = 255  # opaque: transparent pixels are an error (data.decode.still_and_opaque)
  PIL.Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "sub", "rgba.png"))
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not an image")
  return ["gray.jpg", "rgb odd.png", os.path.join("sub", "rgba.png")]


def _manual_maps(workdir, images):
  """Raw CAMs (n, 2, h, w) = sum_k A_k W[k, c] and predictions, without the eval step."""
  import jax.numpy as jnp
  from divisive_jax import checkpoints

  inf = checkpoints.load_for_inference(workdir, "best")
  v = inf.variables
  a = np.asarray(inf.model.apply(v, jnp.asarray(images), train=False, method="features"))
  kernel = np.asarray(inf.variables["params"]["head"]["kernel"])
  bias = np.asarray(inf.variables["params"]["head"]["bias"])
  maps = np.einsum("nhwk,kc->nchw", a, kernel)
  logits = a.mean(axis=(1, 2)) @ kernel + bias
  return maps, logits.argmax(-1)


def test_explain_split(workdir, tmp_path):
  from divisive_jax import data, explain
  from divisive_jax import maps as maps_lib

  out = str(tmp_path / "explain")
  res = explain.explain(workdir, out, split="test", max_images=6, top_fraction=0.2)
  src = data.load_splits(tiny_config().data, workdir).test
  idx = explain.spaced_indices(len(src), 6)
  assert len(idx) == 6 and idx[0] == 0 and idx[-1] == len(src) - 1
  examples = [src[int(i)] for i in idx]
  ids = [e["id"] for e in examples]

  # one panel per image, named by id
  assert sorted(os.listdir(os.path.join(out, "panels"))) == sorted(
    i.replace("/", "_") + ".png" for i in ids
  )
  rows = _ranking(out)
  assert [r["rank"] for r in rows] == [str(k) for k in range(1, 7)]
  assert sorted(r["id"] for r in rows) == sorted(ids)
  energy = [float(r["energy"]) for r in rows]
  assert energy == sorted(energy, reverse=True) and energy[0] > energy[-1] > 0
  assert all(os.path.exists(os.path.join(out, r["panel"])) for r in rows)
  assert all(
    r["human_energy_share"] != "" and r["top1_supports"] in ("predicted", "other") for r in rows
  )
  with open(os.path.join(out, "regions.json")) as f:
    regions = json.load(f)
  assert regions == json.loads(json.dumps(res))
  assert [e["id"] for e in regions["images"]] == [r["id"] for r in rows]
  assert regions["top_fraction"] == 0.2 and regions["cam_grid"] == [8, 8]
  for e in regions["images"]:
    s = e["summary"]
    assert 0.0 <= s["human_energy_share"] <= 1.0 and s["top_regions"]
    assert s["top_regions"][0]["energy"] >= s["top_regions"][-1]["energy"]

  # oracle: CAMs from the features and the head's weights, D and the class means by hand
  images = np.stack([e["image"] for e in examples]) * np.float32(1 / 255)  # as the device does
  maps, pred = _manual_maps(workdir, images)
  labels = np.array([e["label"] for e in examples])
  by_id = {e["id"]: e for e in regions["images"]}
  norm = maps_lib.minmax(maps)
  n = np.arange(6)
  d = norm[n, pred] - norm[n, 1 - pred]
  for k, i in enumerate(ids):
    assert by_id[i]["pred"] == pred[k] and by_id[i]["label"] == labels[k]
    assert by_id[i]["summary"]["energy"] == pytest.approx(np.abs(d[k]).sum(), rel=1e-3, abs=1e-3)
  d_true = norm[n, labels] - norm[n, 1 - labels]
  for c, name in enumerate(("Live", "Spoof")):
    for group, sel, dd in (("pred", pred == c, d), ("true", labels == c, d_true)):
      info = regions["class_means"][f"{group}_{name}"]
      assert info["n"] == int(sel.sum())
      if sel.any():
        got = np.load(os.path.join(out, f"mean_divergence_{group}_{name}.npy"))
        np.testing.assert_allclose(got, dd[sel].mean(0), atol=2e-3)
        assert os.path.getsize(os.path.join(out, f"mean_divergence_{group}_{name}.png")) > 0
      else:
        assert not os.path.exists(os.path.join(out, f"mean_divergence_{group}_{name}.npy"))


def test_explain_with_another_cam_kind(workdir, tmp_path):
  from divisive_jax import explain

  res = explain.explain(
    workdir,
    str(tmp_path / "pp"),
    split="val",
    max_images=2,
    cam_kind="gradcampp",
    shared_scale=True,
  )
  assert res["cam_kind"] == "gradcampp" and res["n_images"] == 2
  with pytest.raises(UserError, match="valid: cam, gradcam, gradcampp"):
    explain.explain(workdir, str(tmp_path / "x"), split="val", cam_kind="gradcam++")


def test_image_files_match_the_data_layer(tmp_path):
  """Odd-sized RGB / gray / RGBA files load exactly as the CSV data layer prepares them."""
  import ml_collections
  from divisive_jax.data import csv_dataset

  folder = str(tmp_path / "imgs")
  names = _odd_images(folder)
  (tmp_path / "p.csv").write_text(
    "".join(f"{s},Live,{n}\n" for s, n in zip(("train", "val", "test"), names))
  )
  for channels in (1, 3):
    cfg = ml_collections.ConfigDict(
      dict(
        csv_path=str(tmp_path / "p.csv"),
        image_dir=folder,
        map_dir="",
        class_names=("Live", "Spoof"),
        image_size=20,
        channels=channels,
        data_dir=str(tmp_path / f"prep{channels}"),
        attack_type_from="none",
      )
    )
    sources = csv_dataset.load(cfg, str(tmp_path))[0]
    for split, name in zip(("train", "val", "test"), names):
      src = sources[split]
      want = src[0]["image"]  # uint8, stored with the source's channels (gray: one)
      assert want.dtype == np.uint8 and want.shape == (20, 20, src.channels)
      want = np.broadcast_to(want, (20, 20, channels))  # gray is replicated on the device
      got = image_files.read_image(os.path.join(folder, name), 20, channels)
      assert got.shape == (20, 20, channels) and got.dtype == np.uint8
      np.testing.assert_array_equal(got, want)  # the same uint8 pixels (the device scales them)


def test_explain_image_folder_cli(workdir, tmp_path):
  folder = str(tmp_path / "imgs")
  names = _odd_images(folder)
  out = str(tmp_path / "explain_images")
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "divisive_jax.explain",
      f"--workdir={workdir}",
      f"--out={out}",
      f"--images={folder}/**/*",
      "--max_images=0",
      "--checkpoint=latest",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Explained 3 image(s) (step 8)" in r.stdout
  assert sorted(os.listdir(os.path.join(out, "panels"))) == [
    "gray.jpg.png",
    "rgb_odd.png.png",
    "sub_rgba.png.png",
  ]
  rows = _ranking(out)
  assert sorted(x["id"] for x in rows) == sorted(names)
  assert all(
    x["label"] == "" and x["true_class"] == "" and x["human_energy_share"] == "" for x in rows
  )
  energy = [float(x["energy"]) for x in rows]
  assert energy == sorted(energy, reverse=True)
  with open(os.path.join(out, "regions.json")) as f:
    regions = json.load(f)
  assert regions["n_images"] == 3 and regions["files_matched"] == 3
  assert regions["checkpoint_step"] == 8
  assert not any(k.startswith("true_") for k in regions["class_means"])
  n_pred = sum(regions["class_means"][f"pred_{c}"]["n"] for c in ("Live", "Spoof"))
  assert n_pred == 3
  written = [f for f in os.listdir(out) if f.startswith("mean_divergence_pred_")]
  assert written and not [f for f in os.listdir(out) if f.startswith("mean_divergence_true_")]


def test_errors(workdir, tmp_path):
  from divisive_jax import explain

  with pytest.raises(UserError, match="no image files match"):
    explain.explain(workdir, str(tmp_path / "o"), images=str(tmp_path / "nothing*.png"))
  with pytest.raises(ValueError, match="unknown split"):
    explain.explain(workdir, str(tmp_path / "o"), split="dev")
  with pytest.raises(ValueError, match="top_fraction"):
    explain.explain(workdir, str(tmp_path / "o"), top_fraction=0.0)
  with pytest.raises(UserError, match="divisive_jax.main"):
    explain.explain(str(tmp_path / "not_a_workdir"), str(tmp_path / "o"))
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot read image .*bad.png"):
    image_files.read_image(str(tmp_path / "bad.png"), 8, 1)
  assert list(explain.spaced_indices(10, 0)) == list(range(10))
  assert list(explain.spaced_indices(10, 3)) == [0, 4, 9]
  taken = set()
  assert [safe_name(x, taken) for x in ("a/b.png", "a b.png", "a_b.png")] == [
    "a_b.png",
    "a_b.png_2",
    "a_b.png_3",
  ]


def test_sanity_check_randomised_models_change_the_maps(workdir, tmp_path):
  """``explain --sanity``: every CAM kind, a cascade of 3 (the head, then the last two backbone
  modules, in the order the model defines them); randomising the head alone already changes the
  CAM (rank correlation with the trained map below 1); the report's three files."""
  from divisive_jax import explain, sanity

  out = str(tmp_path / "out")
  res = explain.explain(workdir, out, split="val", max_images=8, sanity_depth=3)
  rows = res["sanity"]["rows"]
  assert [r["randomised"] for r in rows[:3]] == ["head", "layer3_0", "layer2_0"]
  assert {r["cam_kind"] for r in rows} == {"cam", "gradcam", "gradcampp"} and len(rows) == 9
  for r in rows:
    assert r["rank_correlation"] is None or -1 <= r["rank_correlation"] <= 1
    assert -1 <= r["ssim"] <= 1
  head = [r for r in rows if r["randomised"] == "head" and r["cam_kind"] == "cam"][0]
  assert head["rank_correlation"] < 0.99
  assert set(os.listdir(os.path.join(out, "sanity"))) == {"sanity.json", "sanity.md", "sanity.png"}
  with open(os.path.join(out, "sanity", "sanity.md")) as f:
    assert "| cam | head |" in f.read()
  # The flag: a map that does not change is said so.
  same = np.arange(16.0).reshape(4, 4)
  assert sanity.rank_correlation(same, same) == pytest.approx(1.0)
  assert sanity.ssim(same, same) == pytest.approx(1.0)
  assert np.isnan(sanity.rank_correlation(np.zeros((4, 4)), same))
  report = {**res["sanity"], "flagged": ["gradcam"]}
  assert "**gradcam: its maps do not change when the model is randomised**" in sanity.markdown(
    report
  )
