"""The model-randomisation sanity check of the CAMs (Adebayo et al., NeurIPS 2018, "Sanity Checks
for Saliency Maps"): `explain --sanity`.

Cascading randomisation: the trained model's parameters are replaced, from the output backwards,
by the model's own random initialisation -- first the head, then the last backbone module, then
the one before it, ... (``depth`` steps in all) -- and at each step every CAM kind (`cams.KINDS`)
is computed again on the same images, for the class the TRAINED model predicts. Reported per
kind and step: the Spearman rank correlation between the trained model's map and the
randomised model's (mean over images; a constant map has none and is left out), and the SSIM of
the two min-max normalised maps (one window over the whole CAM grid). A map that explains the
model must change when the model does: a kind whose rank correlation stays above
`UNCHANGED` once everything in the cascade is random is flagged.

Outputs in ``out``: ``sanity.json``, ``sanity.md`` (the table) and ``sanity.png`` (rank
correlation against the cascade step, one line per kind).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from divisive_jax import cams, jsonio, plots, preprocess
from divisive_jax import step as step_lib
from divisive_jax.evaluators import common as evaluation
from divisive_jax.maps import minmax

UNCHANGED = 0.5  # rank correlation above which a fully randomised model's map counts as unchanged


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rho of two maps (average ranks for ties); NaN when either map is constant."""

  def ranks(x):
    _, inv, counts = np.unique(x.reshape(-1), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]

  ra, rb = ranks(a), ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
  """SSIM of two min-max normalised maps over one window (the whole grid), C1 = 0.01^2,
  C2 = 0.03^2."""
  x, y = minmax(np.asarray(a, np.float64)), minmax(np.asarray(b, np.float64))
  mx, my = x.mean(), y.mean()
  cov = ((x - mx) * (y - my)).mean()
  c1, c2 = 0.01**2, 0.03**2
  return float(
    (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (x.var() + y.var() + c2))
  )


def cascade(params: dict, depth: int) -> list[tuple[str, ...]]:
  """The parameter paths randomised at each step: ('head',), then each backbone module from
  the last one defined backwards, ``depth`` steps in all."""
  backbone = list(params.get("backbone", {}))[::-1]
  return [("head",)] + [("backbone", m) for m in backbone[: max(0, depth - 1)]]


def _replace(params: dict, random: dict, path: tuple[str, ...]) -> dict:
  out = dict(params)
  if len(path) == 1:
    out[path[0]] = random[path[0]]
  else:
    out[path[0]] = _replace(params[path[0]], random[path[0]], path[1:])
  return out


class _Maps:
  """Collects the eval step's maps and predictions (an evaluator of `evaluation.run_split`)."""

  host_keys, output_keys = (), ("maps", "pred")

  def __init__(self):
    self.maps, self.pred = [], []

  def update(self, host, outputs):
    self.maps.append(outputs["maps"])
    self.pred.append(outputs["pred"])


def sanity_check(
  inf, source, batch_size: int, out: str, depth: int = 4, seed: int = 0, write: bool = True
) -> dict:
  """Run the cascade on ``source`` (module docstring); return the report, and write it in
  ``out`` (``write``: this process writes files)."""
  config = inf.config
  inputs = preprocess.from_config(config.data)
  size, channels = int(config.data.image_size), int(config.data.channels)
  dummy = np.zeros((1, size, size, channels), np.float32)
  random = inf.model.init(jax.random.key(seed), dummy, train=False)["params"]
  random = jax.device_put(
    random, jax.sharding.NamedSharding(inf.mesh, jax.sharding.PartitionSpec())
  )
  params, stats = inf.variables["params"], inf.variables["batch_stats"]
  steps = cascade(random, depth)  # a fresh init lists the modules in the order they are defined

  def maps_of(kind, p):
    step = step_lib.make_eval_step(inf.model, inf.mesh, kind, config.loss.cam_relu, inputs)
    got = _Maps()
    evaluation.run_split(
      step, {"params": p, "batch_stats": stats}, source, inf.mesh, batch_size, [[got]]
    )
    return np.concatenate(got.maps), np.concatenate(got.pred)

  rows, flagged = [], []
  for kind in cams.KINDS:
    trained, pred = maps_of(kind, params)
    chosen = lambda m: m[np.arange(len(pred)), pred]  # noqa: E731 - the trained model's class
    p = params
    for k, path in enumerate(steps):
      p = _replace(p, random, path)
      randomised = chosen(maps_of(kind, p)[0])
      rho = [rank_correlation(a, b) for a, b in zip(chosen(trained), randomised)]
      sim = [ssim(a, b) for a, b in zip(chosen(trained), randomised)]
      rows.append(
        {
          "cam_kind": kind,
          "step": k + 1,
          "randomised": "/".join(path[1:] or path),
          "rank_correlation": float(np.nanmean(rho)) if not np.all(np.isnan(rho)) else None,
          "ssim": float(np.mean(sim)),
        }
      )
    last = rows[-1]["rank_correlation"]
    if last is not None and last > UNCHANGED:
      flagged.append(kind)
  report = {
    "n_images": int(len(source)),
    "depth": len(steps),
    "unchanged_threshold": UNCHANGED,
    "rows": rows,
    "flagged": flagged,
  }
  if not write:
    return report
  os.makedirs(out, exist_ok=True)
  jsonio.write_json(os.path.join(out, "sanity.json"), report)
  jsonio.write_text(os.path.join(out, "sanity.md"), markdown(report))
  _figure(report, os.path.join(out, "sanity.png"))
  return report


def markdown(report: dict) -> str:
  lines = [
    f"Cascading randomisation on {report['n_images']} image(s): rank correlation and SSIM of "
    "each CAM kind's map (the trained model's predicted class) with the randomised model's.\n",
    "| CAM kind | randomised up to | rank correlation | SSIM |",
    "|---|---|---|---|",
  ]
  for r in report["rows"]:
    rho = "n/a" if r["rank_correlation"] is None else f"{r['rank_correlation']:.3f}"
    lines.append(f"| {r['cam_kind']} | {r['randomised']} | {rho} | {r['ssim']:.3f} |")
  for kind in report["flagged"]:
    lines.append(
      f"\n**{kind}: its maps do not change when the model is randomised** (rank correlation "
      f"> {report['unchanged_threshold']} with everything in the cascade random)."
    )
  return "\n".join(lines) + "\n"


def _figure(report: dict, path: str) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5, 3.2))
  ax = fig.add_subplot(1, 1, 1)
  for kind in dict.fromkeys(r["cam_kind"] for r in report["rows"]):
    rs = [r for r in report["rows"] if r["cam_kind"] == kind]
    y = [np.nan if r["rank_correlation"] is None else r["rank_correlation"] for r in rs]
    ax.plot([r["step"] for r in rs], y, marker="o", label=kind)
  steps = [r for r in report["rows"] if r["cam_kind"] == report["rows"][0]["cam_kind"]]
  ax.set_xticks([r["step"] for r in steps], [r["randomised"] for r in steps], rotation=30)
  ax.set_ylabel("rank correlation with the trained map")
  ax.set_ylim(-1, 1)
  ax.axhline(UNCHANGED, color="grey", lw=0.8, ls="--")
  ax.legend(fontsize=8)
  fig.tight_layout()
  plots.save_figure(fig, path)
