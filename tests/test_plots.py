"""divisive_jax.plots: overlays, ROC figures (axis wording per task), CAM panels (colour bars,
shared scale) and labelled TensorBoard strips."""

import numpy as np
import pytest

from divisive_jax import metrics, panels, plots


def _read_png(path):
  from PIL import Image

  with Image.open(path) as im:
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB"))


def _colorbars(fig) -> dict:
  """{panel title: colour-bar axes} (panel_figure labels each bar's axes)."""
  return {
    ax.get_label()[len("colorbar: ") :]: ax
    for ax in fig.axes
    if ax.get_label().startswith("colorbar: ")
  }


def _roc_data(n=50):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, n)
  s = rng.random(n) + 0.5 * y
  fpr, tpr, _ = metrics.roc_curve(y, s)
  return fpr, tpr, metrics.auroc(y, s)


# ---------------------------------------------------------------------------------- overlays
def test_overlay_shape_and_colours():
  img = np.zeros((30, 40))
  heat = np.zeros((5, 5))
  heat[0, 0] = 1.0
  out = plots.overlay(img, heat, alpha=1.0)
  assert out.shape == (30, 40, 3) and out.dtype == np.uint8
  # jet: 1 -> dark red (128, 0, 0), 0 -> dark blue (0, 0, 128)
  assert out[0, 0, 0] > 100 and out[0, 0, 2] < 30
  assert out[-1, -1, 2] > 100 and out[-1, -1, 0] < 30
  # alpha 0 returns the image; uint8 RGB input is accepted
  rgb = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(plots.overlay(rgb, np.random.rand(3, 3), alpha=0.0), rgb)
  # constant heatmap does not crash
  assert plots.overlay(img, np.ones((4, 4))).shape == (30, 40, 3)


def test_display_map_per_map_and_common_range():
  m = np.array([[2.0, 4.0], [6.0, 10.0]])
  np.testing.assert_allclose(plots.display_map(m), [[0.0, 0.25], [0.5, 1.0]])
  # a common range: values scaled by it and clipped to [0, 1]
  np.testing.assert_allclose(plots.display_map(m, (0.0, 8.0)), [[0.25, 0.5], [0.75, 1.0]])
  assert not plots.display_map(np.full((3, 3), 5.0)).any()  # constant map -> zeros
  assert plots.joint_range([m, np.array([[-1.0, np.nan]])]) == (-1.0, 10.0)
  # overlay with a common range: the weaker map gets weaker colours than on its own
  img = np.zeros((8, 8))
  weak = np.zeros((4, 4))
  weak[0, 0] = 1.0
  own = plots.overlay(img, weak, alpha=1.0)
  common = plots.overlay(img, weak, alpha=1.0, value_range=(0.0, 4.0))
  assert own[0, 0, 0] > 100 and common[0, 0, 0] < own[0, 0, 0]


# --------------------------------------------------------------------------------------- ROC
def test_save_roc_writes_png(tmp_path):
  fpr, tpr, auc = _roc_data()
  p = plots.save_roc(str(tmp_path / "sub" / "roc.png"), fpr, tpr, auc, "test")
  arr = _read_png(p)
  assert arr.shape == (450, 450, 3) and arr.std() > 5  # not blank
  p = plots.save_roc(
    tmp_path / "cls.png", fpr, tpr, None, task="classification", class_names=("Normal", "X")
  )
  assert _read_png(p).shape == (450, 450, 3)


@pytest.mark.parametrize(
  "kw, xlabel, ylabel",
  [
    ({}, "BPCER (bona fide classified as attack)", "1 - APCER (attacks detected)"),
    (
      {"task": "pad", "class_names": ("Live", "Spoof")},
      "BPCER (Live classified as Spoof)",
      "1 - APCER (Spoof detected)",
    ),
    (
      {"task": "classification", "class_names": ("Normal", "Pneumonia")},
      "FPR (Normal classified as Pneumonia)",
      "TPR (Pneumonia recognised)",
    ),
  ],
)
def test_roc_axis_labels_per_task(kw, xlabel, ylabel):
  fpr, tpr, auc = _roc_data()
  fig = plots.roc_figure(fpr, tpr, auc, "t", **kw)
  (ax,) = fig.axes
  assert (ax.get_xlabel(), ax.get_ylabel()) == (xlabel, ylabel)
  assert ax.get_title() == "t"
  assert ax.get_legend().get_texts()[0].get_text() == f"AUROC = {auc:.4f}"
  assert plots.roc_axis_labels(**kw) == (xlabel, ylabel)


def test_roc_unknown_task_names_both():
  with pytest.raises(ValueError, match="pad.*classification"):
    plots.save_roc("/nonexistent/roc.png", [0.0, 1.0], [0.0, 1.0], task="detection")
  with pytest.raises(ValueError, match="class_names"):
    plots.roc_axis_labels("pad", ("a", "b", "c"))


# ------------------------------------------------------------------------------------ panels
def _panel_inputs():
  rng = np.random.default_rng(0)
  img = rng.random((32, 32))
  # raw CAM values of different magnitudes: the shared scale spans both
  maps = {"pred": 3.0 * rng.random((4, 4)) + 1.0, "other": 0.5 * rng.random((4, 4)) - 0.2}
  return img, maps, rng.random((32, 32))


def test_save_panel_writes_png(tmp_path):
  img, maps, human = _panel_inputs()
  width = panels.PANEL_WIDTH + panels.COLORBAR_WIDTH
  p = panels.save_panel(str(tmp_path / "panel.png"), img, maps, human_map=human, title="example")
  arr = _read_png(p)
  # image (no bar) + 2 maps, D, human (with bars)
  assert arr.shape[1] == round((panels.PANEL_WIDTH + 4 * width) * 100) and arr.std() > 5
  p = panels.save_panel(str(tmp_path / "one.png"), img, {"cam": maps["pred"]})
  assert _read_png(p).shape[1] == round((panels.PANEL_WIDTH + width) * 100)
  p = panels.save_panel(tmp_path / "shared.png", img, maps, title="a\nb", shared_scale=True)
  assert _read_png(p).std() > 5


def test_panel_colour_bars():
  img, maps, human = _panel_inputs()
  fig = panels.panel_figure(img, maps, human_map=human, title="x")
  images = [ax for ax in fig.axes if ax.get_images()]
  assert [ax.get_title() for ax in images] == [
    "image",
    "pred",
    "other",
    "D = pred - other",
    "human map",
  ]
  bars = _colorbars(fig)
  assert len(fig.axes) == 5 + 4 and set(bars) == {"pred", "other", "D = pred - other", "human map"}
  assert bars["D = pred - other"].get_ylim() == (-1.0, 1.0)
  assert bars["human map"].get_ylim() == (0.0, 1.0)
  # all image panels have the same size (the bars do not squash the images)
  sizes = {tuple(np.round(ax.get_position().size, 6)) for ax in images}
  assert len(sizes) == 1
  # no D without a second map, no bar without maps
  fig = panels.panel_figure(img, {"cam": maps["pred"]})
  assert len(fig.axes) == 3 and set(_colorbars(fig)) == {"cam"}
  fig = panels.panel_figure(img, maps, divergence=False)
  assert len(fig.axes) == 5 and len(_colorbars(fig)) == 2


def test_panel_shared_scale_limits():
  img, maps, _ = _panel_inputs()
  per_map = _colorbars(panels.panel_figure(img, maps))
  for name in ("pred", "other"):
    assert per_map[name].get_ylim() == (0.0, 1.0)
    assert per_map[name].get_ylabel() == "per-map min-max"
  shared = _colorbars(panels.panel_figure(img, maps, shared_scale=True))
  lo = min(m.min() for m in maps.values())
  hi = max(m.max() for m in maps.values())
  for name in ("pred", "other"):
    np.testing.assert_allclose(shared[name].get_ylim(), (lo, hi))
    assert shared[name].get_ylabel() == "shared scale"
  assert shared["D = pred - other"].get_ylim() == (-1.0, 1.0)  # D keeps its own definition
  # the weaker map is drawn weaker (more blue) than when normalised on its own
  other_shared = plots.overlay(img, maps["other"], value_range=(lo, hi))
  other_own = plots.overlay(img, maps["other"])
  assert other_shared[..., 0].mean() < other_own[..., 0].mean()
  # constant maps on a shared scale do not fail
  fig = panels.panel_figure(img, {"a": np.ones((4, 4)), "b": np.ones((4, 4))}, shared_scale=True)
  assert len(_colorbars(fig)) == 3


# ------------------------------------------------------------------------------------ strips
def test_labelled_strip_layout():
  red = np.zeros((40, 30, 3), np.uint8)
  red[..., 0] = 255
  green = np.zeros((40, 50, 3))
  green[..., 1] = 1.0
  blue = np.zeros((20, 10, 3), np.uint8)  # half height: resized to 40 x 20
  blue[..., 2] = 255
  out = plots.labelled_strip([("Spoof (p=0.83)", red), ("CAM Spoof", green), ("human map", blue)])
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
  band = out.shape[0] - 40
  assert band > 5 and out.shape[1] == 30 + 50 + 20 + 2 * 4
  # the title band is white with dark text over each panel
  title = out[:band].astype(int)
  assert (title.sum(-1) < 200).any() and np.median(title) == 255
  for x0, x1 in ((0, 30), (34, 84), (88, 108)):
    assert (title[:, x0:x1].sum(-1) < 300).any()
  # the panels, left to right, below the band, separated by white gaps
  body = out[band:]
  np.testing.assert_array_equal(body[:, :30], red)
  np.testing.assert_array_equal(body[:, 34:84], np.broadcast_to([0, 255, 0], (40, 50, 3)))
  assert (body[:, 88:108, 2] > 200).all() and (body[:, 88:108, :2] < 50).all()
  assert (body[:, 30:34] == 255).all() and (body[:, 84:88] == 255).all()


def test_labelled_strip_height_and_grey():
  grey = np.linspace(0, 1, 64 * 64).reshape(64, 64)
  out = plots.labelled_strip([("a very long title that cannot fit", grey)], height=32)
  assert out.shape[1] == 32 and out[-32:].shape == (32, 32, 3)
  assert (out[: out.shape[0] - 32].sum(-1) < 300).any()  # shortened title still drawn
  with pytest.raises(ValueError):
    plots.labelled_strip([])
