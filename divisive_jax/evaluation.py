"""Running a model over a split and evaluating a checkpoint (the trainer's final evaluation and
`divisive_jax.evaluate` share this).

* `run_split`: every example of a source exactly once (the last batch padded and masked), fed
  batch by batch to evaluators (`divisive_jax.evaluators`); only the host fields and outputs
  the evaluators ask for are gathered across processes (no images unless one needs them).
* `evaluate_checkpoint`: the configured evaluators on the requested splits, writing
  ``eval_<split>.json`` and each evaluator's files. Thresholds are chosen on the VALIDATION split
  and applied to the others: validation scores come from this call when 'val' is evaluated
  first (in memory), else from the cache of `scores` when it matches the weights and data, else
  from a validation pass made here.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from divisive_jax import evaluators as evaluators_lib
from divisive_jax import jsonio, metrics, multihost, preprocess, scores, sharding
from divisive_jax.data import pipeline
from divisive_jax.errors import ConfigError
from divisive_jax.evaluators.pad import PadEvaluator

SPLITS = ("train", "val", "test")


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


def run_split(
  eval_step, variables, source, mesh, batch_size: int, evaluators: Sequence, members: bool = False
) -> None:
  """Feed every example of ``source`` once to each evaluator (valid rows only, in order).

  ``members``: the eval step is a population's (outputs with a leading member axis) and
  ``evaluators`` holds one list of evaluators per member.
  """
  groups = list(evaluators) if members else [evaluators]
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
    for m, group in enumerate(wanted):
      o = {k: v[m] for k, v in out.items()} if members else out
      valid = o["valid"] > 0
      for e, hk, ok in group:
        e.update({k: np.asarray(host[k])[valid] for k in hk}, {k: o[k][valid] for k in ok})


def summarize(evaluators: Sequence) -> dict[str, Any]:
  """The evaluators' summaries as one dict: ``key=None`` at the top level, else under key."""
  out: dict[str, Any] = {}
  for e in evaluators:
    s = e.summary()
    if e.key is None:
      out.update(s)
    else:
      out[e.key] = s
  return out


def evaluate_checkpoint(
  workdir: str,
  config,
  splits,
  model,
  variables,
  step: int,
  which: str | int,
  mesh,
  split_names: Sequence[str] = ("val", "test"),
  batch_size: int | None = None,
  evals_config=None,
  eval_step=None,
) -> dict[str, dict]:
  """Evaluate ``variables`` (checkpoint ``step``) on ``split_names``; returns {split: json}."""
  from divisive_jax import step as step_lib

  for name in split_names:
    check_split(name)
  evals_config = config.evals if evals_config is None else evals_config
  if eval_step is None:
    eval_step = step_lib.make_eval_step(
      model, mesh, config.loss.cam_kind, config.loss.cam_relu, preprocess.from_config(config.data)
    )
  gbs = eval_batch_size(config, batch_size)
  lead = multihost.is_lead()
  key = scores.val_cache_key(step, variables, splits, config.data)

  def context(split):
    return evaluators_lib.Context(
      split, tuple(splits.class_names), tuple(splits.attack_types), config.task, step
    )

  def run(split, evals, val):
    source = getattr(splits, split)
    logging.info(
      "Evaluating the %s checkpoint (step %d) on %s (%d examples, batch %d, %d devices)",
      which,
      step,
      split,
      len(source),
      gbs,
      jax.device_count(),
    )
    evs = evaluators_lib.make(evals, context(split), val=val)
    run_split(eval_step, variables, source, mesh, gbs, evs)
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
      jsonio.write_json(os.path.join(workdir, f"eval_{split}.json"), out)
      if split == "val":  # scores_val.csv (just written) now caches these weights' scores
        scores.save_val_key(workdir, key)
    multihost.sync(f"evaluate_{split}_written")
    logging.info(
      "%s: AUROC %s, APCER %s, BPCER %s at the val-EER threshold %s; wrote %s",
      split,
      out.get("auroc"),
      out.get("apcer"),
      out.get("bpcer"),
      out.get("threshold"),
      os.path.join(workdir, f"eval_{split}.json"),
    )
    results[split] = jsonio.to_jsonable(out)
  return results


def _save_val(workdir: str, pad: PadEvaluator, key: dict, lead: bool):
  """Validation (labels, scores) of a thresholds-only pass; process 0 caches them."""
  r = pad.result()
  if lead:
    scores.forget_val(workdir)
    scores.write_csv(os.path.join(workdir, "scores_val.csv"), r, pad.ctx.attack_types)
    scores.save_val_key(workdir, key)
  return r["label"], r["score"]


def final_evaluation(config, workdir, splits, setup, ckpts, state, eval_step) -> dict:
  """The best checkpoint on val and test, with the splits and eval step already in memory."""
  best = ckpts.resolve("best")
  if best == int(jax.device_get(state.step)):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
  else:
    from divisive_jax import state as state_lib

    _, target = state_lib.abstract_variables(config, setup.mesh)
    variables = ckpts.restore_variables(best, target)
  return evaluate_checkpoint(
    workdir,
    config,
    splits,
    setup.model,
    variables,
    best,
    "best",
    setup.mesh,
    eval_step=eval_step,
  )


def summary_text(workdir: str, results: dict) -> str:
  """The closing lines of a run, for a newcomer."""
  val, test = results.get("val", {}), results.get("test", {})

  def f(x):
    return "n/a" if x is None else f"{x:.3f}"

  return (
    f"Done. Best checkpoint: step {test.get('checkpoint_step', val.get('checkpoint_step'))} "
    f"(chosen on validation). Validation AUROC {f(val.get('auroc'))}; test AUROC "
    f"{f(test.get('auroc'))}, with APCER {f(test.get('apcer'))} and BPCER {f(test.get('bpcer'))} "
    f"at the threshold {f(test.get('threshold'))} chosen on validation (equal error rate), never "
    f"on test. Files: {workdir}/eval_test.json, roc_test.png, scores_test.csv; CAM panels: "
    f"python -m divisive_jax.explain --workdir={workdir} --out={workdir}/explain"
  )
