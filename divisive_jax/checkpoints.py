"""Checkpoints with orbax: the latest one and the best one on validation, sharded arrays saved
and restored with their shardings, plus a JSON record (step, data position, best score).

Writes are atomic (orbax writes a temporary directory and renames it when complete), so a run
killed at any moment leaves the previous checkpoints intact and resumes from the newest complete
one. Kept checkpoints are chosen by a preservation policy: the latest one, and the one with the
best validation score (`score`, higher is better; for a metric where lower is better the score
is its negation).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


class Checkpoints:
  """`latest` + `best` orbax checkpoints of a TrainState in `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, async_save: bool = True):
    policy = pp.AnyPreservationPolicy(
      [
        pp.LatestN(1),
        pp.BestN(get_metric_fn=lambda m: m["score"], n=1, keep_checkpoints_without_metrics=False),
      ]
    )
    # best_fn is what makes orbax persist the metrics with each checkpoint (so `best` survives
    # reopening the workdir); which checkpoints are kept is the preservation policy's job.
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      create=True,
      best_fn=lambda m: m["score"],
      best_mode="max",
      enable_async_checkpointing=async_save,
    )
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the highest validation score, or None if no checkpoint has one."""
    scored = [
      (m["score"], s)
      for s in self.manager.all_steps()
      if (m := self.manager.metrics(s)) is not None
    ]
    return max(scored)[1] if scored else None

  def save(self, step: int, state, meta: dict, score: float | None = None, force=True) -> None:
    metrics = None if score is None else {"score": float(score)}
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=force,
    )

  def restore(self, step: int, target) -> tuple[Any, dict]:
    """Restore `step` into the structure, dtypes and shardings of `target` (arrays or
    ShapeDtypeStructs)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], dict(out["meta"])

  def resolve(self, which: str | int) -> int:
    """'latest', 'best' (falls back to latest when no validation score was saved) or a step."""
    steps = self.manager.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"no checkpoint in {self.directory}; train first with "
        "python -m divisive_jax.main --config=... --workdir=..."
      )
    if which == "latest":
      return self.latest_step()
    if which == "best":
      best = self.best_step()
      return self.latest_step() if best is None else best
    step = int(which)
    if step not in steps:
      raise ValueError(f"checkpoint step {step} not in {self.directory}; available: {steps}")
    return step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@dataclasses.dataclass
class Inference:
  """A restored model for evaluation and explanation."""

  config: Any
  model: Any
  state: Any  # TrainState (opt_state included; evaluation uses params and batch_stats)
  step: int
  mesh: Any


def load_for_inference(workdir: str, which: str | int = "best") -> Inference:
  """Rebuild the model of `<workdir>/config.json` and restore a checkpoint onto all devices."""
  from divisive_jax import train  # local import: train imports this module
  import ml_collections

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: is {workdir} a divisive_jax workdir? "
      "Train with python -m divisive_jax.main --workdir=..."
    )
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpts = Checkpoints(workdir, async_save=False)
  step = ckpts.resolve(which)
  model, target, mesh = train.abstract_state(config)
  state, _ = ckpts.restore(step, target)
  ckpts.close()
  return Inference(config=config, model=model, state=state, step=step, mesh=mesh)
