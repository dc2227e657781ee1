"""Evaluators: plug-ins that turn a split's eval-step outputs into figures and files, and the
runner that feeds them (the trainer's evaluations, its final evaluation and
`divisive_jax.evaluate` share it).

Protocol (one per evaluator class; big_vision's ``config.evals`` at this project's scale):

* ``cls(ctx, **options)``: ``ctx`` is a `Context` (split, class names, attack types, task,
  checkpoint step); ``options`` come from ``config.evals.<name>``.
* ``host_keys``: the host fields of a batch it reads (a subset of ``id``, ``label``,
  ``attack_type``, ``has_saliency``, ``saliency``, ``image``); may shrink as it fills (the
  TensorBoard strips stop asking for images). Only these are gathered across processes.
* ``output_keys``: the eval-step outputs it reads (``score``, ``pred``, ``logits``, ``ce``,
  ``maps`` (n, 2, h, w)).
* ``update(host, outputs)``: one batch, valid rows only, in dataset order. No files.
* ``summary() -> dict``: JSON-able figures; ``key`` names where they go in
  ``eval_<split>.json`` (None: merged at the top level). No files.
* optional ``write(directory, summary)``: its files (process 0 only): the one place an evaluator
  writes.

The runner:

* `run_split`: every example of a source exactly once (the last batch padded and masked), fed
  batch by batch to evaluators (no images gathered unless one needs them). With a population's
  eval step (outputs with a leading member axis) each member has its own evaluators.
* `evaluate_checkpoint`: the configured evaluators (`make`, from ``config.evals``) on the
  requested splits, writing ``eval_<split>.json`` and each evaluator's files. Thresholds are
  chosen on the VALIDATION split and applied to the others: validation scores come from this
  call when 'val' is evaluated first (in memory), else from the cache of `scores` when it
  matches the weights and data, else from a validation pass made here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from divisive_jax import jsonio, layout, metrics, multihost, preprocess, scores, sharding
from divisive_jax.data import pipeline
from divisive_jax.errors import ConfigError
from divisive_jax.evaluators.alignment import AlignmentEvaluator, EntropyEvaluator
from divisive_jax.evaluators.divergence import DivergenceEvaluator
from divisive_jax.evaluators.images import CamImages
from divisive_jax.evaluators.pad import PadEvaluator

SPLITS = ("train", "val", "test")

EVALUATORS = {
  "pad": PadEvaluator,
  "alignment": AlignmentEvaluator,
  "entropy": EntropyEvaluator,
  "divergence": DivergenceEvaluator,
  "tb_images": CamImages,
}


@dataclasses.dataclass(frozen=True)
class Context:
  split: str
  class_names: tuple[str, ...]
  attack_types: tuple[str, ...] = ()
  task: str = "pad"
  step: int = 0


def make(evals_config, ctx: Context, **extra) -> list:
  """The evaluators named in ``evals_config`` (a dict of option dicts), in its order.

  ``extra``: keyword arguments for the evaluators that take them by name (e.g. ``val`` for
  ``pad``).
  """
  out = []
  for name, options in evals_config.items():
    cls = EVALUATORS[name]
    extra_args = {k: v for k, v in extra.items() if k in getattr(cls, "extra_args", ())}
    out.append(cls(ctx, **dict(options, **extra_args)))
  return out


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
  return split


def eval_batch_size(config, requested: int | None = None) -> int:
  """The requested (or the config's) evaluation batch size, rounded up to a multiple of the
  global device count (every device gets the same number of rows)."""
  n = int(requested or 0) or int(config.eval_batch_size) or int(config.batch_size)
  if n <= 0:
    raise ConfigError(f"evaluation batch size must be positive, got {n}")
  d = jax.device_count()
  rounded = -(-n // d) * d
  if rounded != n:
    logging.info("Evaluation batch size %d rounded up to %d (%d devices).", n, rounded, d)
  return rounded


def run_split(eval_step, variables, source, mesh, batch_size: int, groups: Sequence) -> None:
  """Feed every example of ``source`` once to each evaluator (valid rows only, in order).

  ``groups``: one list of evaluators per member of the eval step (`step.split_members`: one
  member, outputs without a member axis).
  """
  from divisive_jax import step as step_lib

  groups = list(groups)
  for local in pipeline.eval_batches(
    source,
    batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    out = eval_step(variables, sharding.to_global(local, mesh))
    wanted = [[(e, tuple(e.host_keys), tuple(e.output_keys)) for e in g] for g in groups]
    flat = [w for g in wanted for w in g]
    host_keys = sorted({k for _, hk, _ in flat for k in hk})
    out_keys = sorted({k for _, _, ok in flat for k in ok} | {"valid"})
    out = {k: multihost.to_host(out[k]) for k in out_keys}
    host = pipeline.to_host_floats(multihost.gather_rows({k: local[k] for k in host_keys}))
    for o, group in zip(step_lib.split_members(out, len(groups)), wanted):
      valid = o["valid"] > 0
      for e, hk, ok in group:
        e.update({k: np.asarray(host[k])[valid] for k in hk}, {k: o[k][valid] for k in ok})


def validation_logs(evaluators: Sequence) -> tuple[dict, dict]:
  """(scalars, images) of a validation run during training (``config.val_evals``): the PAD
  report's selection figures (val/accuracy, val/auroc, val/loss), every other evaluator's
  numbers as ``val/<key>/...``, and the strips of those that draw them (``images``)."""
  scalars, images = {}, {}
  for e in evaluators:
    if isinstance(e, PadEvaluator):
      scalars.update(e.validation_metrics())
    elif hasattr(e, "images"):
      images.update(e.images)
    else:
      scalars.update(_numbers(e.summary(), f"val/{e.key}"))
  return scalars, images


def _numbers(tree: dict, prefix: str) -> dict[str, float]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}/{k}"] = float(v)
  return out


def summarize(evaluators: Sequence) -> dict[str, Any]:
  """The evaluators' summaries as one dict: ``key=None`` at the top level, else under key."""
  out: dict[str, Any] = {}
  for e in evaluators:
    if e.key is None:
      out.update(e.summary())
    else:
      out[e.key] = e.summary()
  return out


def evaluate_checkpoint(
  workdir: str,
  splits,
  inf,
  which: str | int,
  split_names: Sequence[str] = ("val", "test"),
  batch_size: int | None = None,
  evals_config=None,
  eval_step=None,
) -> dict[str, dict]:
  """Evaluate a checkpoint on ``split_names``; returns {split: json}. ``inf``: its config,
  model, variables, step and mesh (`checkpoints.Inference`); ``eval_step``: a compiled eval
  step of that model (default: built here)."""
  from divisive_jax import step as step_lib

  config, variables, step, mesh = inf.config, inf.variables, inf.step, inf.mesh
  for name in split_names:
    check_split(name)
  evals_config = config.evals if evals_config is None else evals_config
  if eval_step is None:
    eval_step = step_lib.make_eval_step(
      inf.model,
      mesh,
      config.loss.cam_kind,
      config.loss.cam_relu,
      preprocess.from_config(config.data),
    )
  gbs = eval_batch_size(config, batch_size)
  lead = multihost.is_lead()
  key = scores.val_cache_key(step, variables, splits, config.data)

  def run(split, evals, val):
    source = getattr(splits, split)
    logging.info(
      f"Evaluating the {which} checkpoint (step {step}) on {split} ({len(source)} examples, "
      f"batch {gbs}, {jax.device_count()} devices)"
    )
    ctx = Context(split, tuple(splits.class_names), tuple(splits.attack_types), config.task, step)
    evs = make(evals, ctx, val=val)
    run_split(eval_step, variables, source, mesh, gbs, [evs])
    return evs

  val, cached, results = None, False, {}
  for split in split_names:
    if split != "val" and val is None:
      hit = scores.load_val(workdir, key)
      cached = multihost.all_agree(hit is not None)
      if cached:
        logging.info("Validation scores of step %d reused from scores_val.csv", step)
        val = (hit["label"], hit["score"])
      else:
        logging.info("Running validation (step %d) for the thresholds", step)
        (pad,) = run("val", {"pad": {}}, None)
        val = _save_val(workdir, pad, key, lead)
    evs = run(split, evals_config, None if split == "val" else val)
    out = summarize(evs)
    if split == "val":
      r = next(e for e in evs if isinstance(e, PadEvaluator)).result()
      val, cached = (r["label"], r["score"]), True
    out.update(
      checkpoint_step=int(step),
      checkpoint=str(which),
      trained_step=int(inf.meta.get("trained_step", step)),
      status=layout.Status.of(inf.meta).to_json(),
      val_scores_cached=bool(cached) and split != "val",
      score_polarity=metrics.SCORE_POLARITY,
      cam_kind=str(config.loss.cam_kind),
      heldout_attack=str(config.data.heldout_attack),
    )
    if lead:
      if split == "val":  # scores_val.csv is rewritten now: no key may vouch for it meanwhile
        scores.forget_val(workdir)
      for e in evs:
        if hasattr(e, "write"):
          e.write(workdir, out if e.key is None else out[e.key])
      jsonio.write_json(layout.eval_file(workdir, split), out)
      if split == "val":  # scores_val.csv (just written) now caches these weights' scores
        scores.save_val_key(workdir, key)
    multihost.sync(f"evaluate_{split}_written")
    logging.info(
      f"{split}: AUROC {out.get('auroc')}, APCER {out.get('apcer')}, BPCER {out.get('bpcer')} at "
      f"the val-EER threshold {out.get('threshold')}; wrote {layout.eval_file(workdir, split)}"
    )
    results[split] = jsonio.to_jsonable(out)
  return results


def _save_val(workdir: str, pad: PadEvaluator, key: dict, lead: bool):
  """Validation (labels, scores) of a thresholds-only pass; process 0 caches them."""
  r = pad.result()
  if lead:
    scores.forget_val(workdir)
    scores.write_csv(layout.scores_file(workdir, "val"), r, pad.ctx.attack_types)
    scores.save_val_key(workdir, key)
  return r["label"], r["score"]


def summary_text(workdir: str, results: dict, rule: str) -> str:
  """The closing lines of a run, for a newcomer; ``rule``: how its checkpoint was chosen."""
  val, test = results.get("val", {}), results.get("test", {})
  status = layout.Status.of(test or val).describe()

  def f(x):
    return "n/a" if x is None else f"{x:.3f}"

  return (
    f"Done. Best checkpoint: step {test.get('checkpoint_step', val.get('checkpoint_step'))}, "
    f"chosen on validation by {rule}.{f' The run {status}.' if status else ''} Validation AUROC "
    f"{f(val.get('auroc'))}; test AUROC {f(test.get('auroc'))}, with APCER "
    f"{f(test.get('apcer'))} and BPCER {f(test.get('bpcer'))} at the threshold "
    f"{f(test.get('threshold'))} chosen on validation (equal error rate), never on test. Files: "
    f"{layout.eval_file(workdir, 'test')}, {layout.eval_file(workdir, 'test', 'roc', '.png')}, "
    f"{layout.scores_file(workdir, 'test')}; CAM panels: "
    f"python -m divisive_jax.explain --workdir={workdir} --out={workdir}/explain"
  )
