r"""The Divisive Decisions post-hoc tool: which image regions separate the two classes.

CLI::

  python -m divisive_jax.explain --workdir=W --out=DIR [--checkpoint=best|latest|STEP]
      [--split=test | --images=GLOB] [--max_images=32] [--top_fraction=0.1] [--batch_size=N]
      [--cam_kind=cam|gradcam|gradcampp] [--shared_scale] [--sanity [--sanity_depth=4]]

Library: ``explain(workdir, out, which='best', split='test', images=None, max_images=32,
top_fraction=0.1, ...)``.

Per image: the raw CAM of the PREDICTED class and of the OTHER class (the CAM kind of the
workdir's ``config.loss.cam_kind``, or ``--cam_kind``; computed by the evaluation step,
`step.make_eval_step`, so there is one CAM implementation) and the divergence map
``D = norm(CAM_pred) - norm(CAM_other)`` on the CAM grid. The work is the divergence evaluator's
(`evaluators.divergence`: panels with colour bars, ``ranking.csv``, ``regions.json``, per-class
mean maps); this module chooses the images and writes the files. ``--sanity`` adds the model-randomisation
sanity check of every CAM kind on the same images (`sanity`: ``DIR/sanity/``).

Images: ``--split`` takes ``max_images`` examples evenly spaced over the split (0 = all;
evenly spaced so that a split stored class by class still yields both classes). ``--images``
takes files matching GLOB (``**`` recursive; a directory means every image in it), sorted, the
same even spacing, read by `data.image_files.ImageFilesSource` exactly as the CSV data layer
reads images; no human map, label unknown; ids are paths relative to the files' common folder.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import flags, logging

from divisive_jax import cams, checkpoints, cli, jsonio, multihost, preprocess, sanity
from divisive_jax import step as step_lib
from divisive_jax.data import Selection, load_splits
from divisive_jax.data.image_files import ImageFilesSource, find_images
from divisive_jax.errors import ConfigError
from divisive_jax.evaluate import check_which
from divisive_jax.evaluators import Context, DivergenceEvaluator
from divisive_jax.evaluators import common as evaluation


def spaced_indices(n: int, max_images: int) -> np.ndarray:
  """``max_images`` indices evenly spaced over range(n) (all of them when max_images <= 0)."""
  if max_images <= 0 or max_images >= n:
    return np.arange(n)
  return np.unique(np.round(np.linspace(0, n - 1, max_images)).astype(np.int64))


def explain(
  workdir: str,
  out: str,
  which: str | int = "best",
  split: str | None = "test",
  images: str | None = None,
  max_images: int = 32,
  top_fraction: float = 0.1,
  batch_size: int | None = None,
  max_regions: int = 10,
  cam_kind: str | None = None,
  shared_scale: bool = False,
  sanity_depth: int = 0,
) -> dict:
  """Run the post-hoc divergence tool; see the module docstring. Returns regions.json's dict
  (with ``sanity_depth`` > 0, and the sanity check's report under 'sanity')."""
  which = check_which(which)
  if not 0.0 < float(top_fraction) <= 1.0:
    raise ConfigError(f"top_fraction must be a fraction in (0, 1], got {top_fraction}")
  if images is None:
    evaluation.check_split(split)
  else:
    paths = find_images(images)
  inf = checkpoints.load_for_inference(workdir, which)
  config = inf.config
  cam_kind = cam_kind or config.loss.cam_kind
  if cam_kind not in cams.KINDS:
    raise ConfigError(f"--cam_kind={cam_kind!r}; valid: {', '.join(cams.KINDS)}")
  if images is None:
    splits = load_splits(config.data, workdir)
    class_names, attack_types = tuple(splits.class_names), tuple(splits.attack_types)
    full = getattr(splits, split)
    source = Selection([(full, spaced_indices(len(full), int(max_images)))])
    origin = {"split": split, "split_size": len(full)}
  else:
    chosen = [paths[i] for i in spaced_indices(len(paths), int(max_images))]
    source = ImageFilesSource(chosen, config.data.image_size, config.data.channels)
    class_names, attack_types = tuple(config.data.class_names), ()
    origin = {"images": images, "files_matched": len(paths)}
  if len(source) == 0:
    raise ConfigError(f"nothing to explain: split {split!r} is empty")

  lead = multihost.is_lead()
  eval_step = step_lib.make_eval_step(
    inf.model, inf.mesh, cam_kind, config.loss.cam_relu, preprocess.from_config(config.data)
  )
  gbs = evaluation.eval_batch_size(config, batch_size)
  logging.info(
    f"Explaining {len(source)} image(s) with the {which} checkpoint (step {inf.step}) of "
    f"{workdir} -> {out}"
  )
  ctx = Context(split or "images", class_names, attack_types, config.task, inf.step)
  tool = DivergenceEvaluator(
    ctx,
    labels_known=images is None,
    write_files=lead,
    top_fraction=top_fraction,
    max_regions=max_regions,
    shared_scale=shared_scale,
  )
  evaluation.run_split(eval_step, inf.variables, source, inf.mesh, gbs, [[tool]])
  result: dict[str, Any] = {}
  if lead:
    result = {
      "workdir": os.path.abspath(workdir),
      "checkpoint": str(which),
      "checkpoint_step": int(inf.step),
      **origin,
      "cam_kind": cam_kind,
      "image_size": int(config.data.image_size),
      **tool.summary(),
    }
    tool.write(out, result)
    result = jsonio.to_jsonable(result)
  if sanity_depth > 0:
    check = sanity.sanity_check(
      inf, source, gbs, os.path.join(out, "sanity"), sanity_depth, write=lead
    )
    result["sanity"] = check
  multihost.sync("explain_written")
  return result


def _define_flags():
  flags.DEFINE_string("workdir", None, "Trained workdir (with config.json and checkpoints/).")
  flags.DEFINE_string("out", None, "Output directory for panels, ranking.csv, regions.json.")
  flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
  flags.DEFINE_string("split", "test", "Data split to explain (train | val | test).")
  flags.DEFINE_string(
    "images",
    None,
    "Glob of image files (or a folder) to explain instead of a split; quote it to keep the "
    "shell from expanding it.",
  )
  flags.DEFINE_integer("max_images", 32, "Images to explain (evenly spaced; 0 = all).")
  flags.DEFINE_float("top_fraction", 0.1, "Fraction of |D| pixels forming the regions.")
  flags.DEFINE_integer("batch_size", None, "Batch size (default: the config's).")
  flags.DEFINE_string("cam_kind", None, "CAM kind (default: the workdir's config.loss.cam_kind).")
  flags.DEFINE_bool("shared_scale", False, "One colour range for both CAMs of a panel.")
  flags.DEFINE_bool("sanity", False, "Also the model-randomisation check of every CAM kind.")
  flags.DEFINE_integer("sanity_depth", 4, "Cascade steps of --sanity: the head, then modules.")
  multihost.define_flags()
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  f = flags.FLAGS
  if f.images and f["split"].present:
    raise ConfigError("give either --split or --images, not both")
  res = explain(
    f.workdir,
    f.out,
    f.checkpoint,
    None if f.images else f.split,
    f.images,
    f.max_images,
    f.top_fraction,
    f.batch_size,
    cam_kind=f.cam_kind,
    shared_scale=f.shared_scale,
    sanity_depth=f.sanity_depth if f.sanity else 0,
  )
  if multihost.is_lead():
    print(
      f"Explained {res['n_images']} image(s) (step {res['checkpoint_step']}); wrote "
      f"{f.out}/ranking.csv, regions.json, panels/ and mean_divergence_*."
    )
    for e in res["images"][:5]:
      top = e["summary"]["top_regions"][:1]
      where = (
        f"; top region supports {top[0]['supports']} at (row, col) fraction "
        f"({top[0]['centroid_frac'][0]:.2f}, {top[0]['centroid_frac'][1]:.2f})"
        if top
        else ""
      )
      print(
        f"  {e['rank']}. {e['id']}: pred {e['pred_class']}, sum|D| = "
        f"{e['summary']['energy']:.2f}{where}"
      )
    if "sanity" in res:
      print(sanity.markdown(res["sanity"]), end="")
      print(f"wrote {f.out}/sanity/sanity.json, sanity.md and sanity.png")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
