"""Checkpoints with orbax: the latest one and the best one on validation, sharded arrays saved
and restored with their shardings, plus a JSON record (step, data position, best score).

Layout: each checkpoint holds three items: ``variables`` ({'params', 'batch_stats'}: all that
inference restores), ``train`` (step, optimiser state, rng) and ``meta`` (JSON: the run's
position, last validation figures, best evaluation and status, `loop.checkpoint_meta`; the loss
weights are the config's and are not restored from here). Writes are atomic (orbax writes a
temporary directory and renames it when complete), so a run killed at any moment leaves the
previous checkpoints intact and resumes from the newest complete one. Kept checkpoints (a
preservation policy): the latest one, and the best on validation by the trainer's rule
(`selection_key`, `loop.Best`).

A failed write (no space left on device, a file-size limit, a read-only disk) raises
`CheckpointError` with one line naming the step, the folder and the last complete checkpoint. A
checkpoint whose files cannot be read (truncated, deleted) raises `DamagedCheckpointError` naming
it; `set_aside` moves it to ``<workdir>/damaged_checkpoints/`` (`resume` falls back past it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from divisive_jax import config_base, jsonio, layout, sharding
from divisive_jax.errors import CheckpointError, ConfigError, DamagedCheckpointError, WorkdirError
from divisive_jax.errors import disk_full

_ITEMS = ("variables", "train", "meta")


class Checkpoints:
  """`latest` + `best` orbax checkpoints of a TrainState in ``<workdir>/checkpoints``."""

  def __init__(
    self, workdir: str, *, async_save: bool = True, keep_latest: int = 1, writer: bool = False
  ):
    """``writer``: the training job's (leftover temporary folders of a killed save are removed;
    readers, which may look while a job writes, leave them)."""
    policy = pp.AnyPreservationPolicy(
      [
        pp.LatestN(keep_latest),
        pp.BestN(get_metric_fn=selection_key, n=1, keep_checkpoints_without_metrics=False),
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
      cleanup_tmp_directories=writer,
    )
    self.directory = layout.path(os.path.abspath(workdir), layout.CHECKPOINTS)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def set_aside(self, step: int) -> str:
    """Move checkpoint ``step`` (damaged) to ``<workdir>/damaged_checkpoints/``; its new path."""
    folder = layout.path(os.path.dirname(self.directory), layout.DAMAGED)
    os.makedirs(folder, exist_ok=True)
    target, n = os.path.join(folder, str(step)), 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(folder, f"{step}_{n}")
    shutil.move(os.path.join(self.directory, str(step)), target)
    self.reload()
    return target

  def reload(self) -> None:
    """Read the checkpoints from the file system again (another job or `set_aside` changed them)."""
    self.manager.reload()

  def discard_after(self, step: int) -> list[int]:
    """Delete the complete checkpoints newer than ``step`` (a population resumed from its
    members' common step redoes them); returns their steps."""
    newer = [s for s in self.manager.all_steps() if s > step]
    for s in newer:
      self.manager.delete(s)
    return newer

  def best_step(self) -> int | None:
    """The best step by the selection rule (`selection_key`); None if none has a score."""
    scored = [
      (selection_key(dict(m, step=s)), s)
      for s in self.manager.all_steps()
      if (m := self.manager.metrics(s)) is not None
    ]
    return max(scored)[1] if scored else None

  def save(self, step: int, state, meta: dict, score=None) -> None:
    """``score``: (selection score, validation loss) of this step's evaluation, or None."""
    nbytes = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
    if problem := space_problem(self.directory, nbytes):
      raise CheckpointError(self._no_space(f"{problem} to save checkpoint {step} in"))
    metrics = None
    if score is not None:
      metrics = {"score": float(score[0]), "val_loss": float(score[1]), "step": int(step)}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    meta = jsonio.to_jsonable(meta)  # strict JSON: a non-finite score (none yet) is null
    with self._write_errors(step):
      self.manager.save(
        step,
        args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables),
          train=ocp.args.StandardSave(train),
          meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
      )

  def restore(self, step: int, target) -> tuple[Any, dict]:
    """Restore ``step`` into the structure, dtypes and shardings of ``target`` (a TrainState of
    arrays or ShapeDtypeStructs)."""
    self._check_layout(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    train = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
    variables = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    out = self._read(
      step,
      variables=ocp.args.StandardRestore(variables),
      train=ocp.args.StandardRestore(train),
      meta=ocp.args.JsonRestore(),
    )
    return target.replace(**out["variables"], **out["train"]), dict(out["meta"])

  def meta(self, step: int) -> dict:
    """The JSON record of checkpoint ``step`` (`loop.checkpoint_meta`), without its arrays."""
    return dict(self._read(step, meta=ocp.args.JsonRestore())["meta"])

  def restore_variables(self, step: int, target) -> dict:
    """Only {'params', 'batch_stats'} of ``step`` (inference): the optimiser is not read."""
    self._check_layout(step)
    return self._read(step, variables=ocp.args.StandardRestore(target))["variables"]

  def _read(self, step: int, **items):
    """orbax's restore of ``items`` at ``step``: a model that does not fit is one line, and so
    is a checkpoint whose files cannot be read (`DamagedCheckpointError`)."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if "structure" in str(e) or "shape" in str(e):
        raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} does not fit this config's model "
          "or optimiser (they changed since it was written); train in a new workdir"
        ) from None
      error = e
    except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise many kinds
      error = e
    while error.__cause__ is not None or error.__context__ is not None:
      error = error.__cause__ or error.__context__
    why = (str(error).splitlines() or [type(error).__name__])[0][:300]
    raise DamagedCheckpointError(
      f"checkpoint {step} in {self.directory} cannot be read (damaged: {why})", step
    ) from None

  def resolve(self, which: str | int) -> int:
    """'latest', 'best' (falls back to latest when no validation score was saved) or a step."""
    steps = self.manager.all_steps()
    if not steps:
      raise CheckpointError(
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
      raise ConfigError(f"checkpoint step {step} not in {self.directory}; available: {steps}")
    return step

  def wait(self) -> None:
    with self._write_errors(None):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def close_quietly(self) -> None:
    """Close while another error is on its way: a failed pending write is logged in one line."""
    try:
      self.close()
    except Exception as e:  # noqa: BLE001 - the error being raised matters more
      logging.warning("Closing the checkpoints after an error: %s", str(e).splitlines()[0])

  def _check_layout(self, step: int) -> None:
    folder = os.path.join(self.directory, str(step))
    old, new = (os.path.isdir(os.path.join(folder, item)) for item in ("state", "variables"))
    if old and not new:
      raise CheckpointError(
        f"{folder} was written by an older divisive_jax (one 'state' item); train again in a "
        "new workdir or evaluate it with the version that wrote it"
      )

  def _write_errors(self, step):
    """A failed write (this checkpoint's or the one before, in the background) for lack of
    space -> one `CheckpointError` naming the folder and the last complete checkpoint."""
    which = f"checkpoint {step}" if step is not None else "a checkpoint"
    return disk_full(
      CheckpointError,
      lambda why: self._no_space(f"{why} while saving {which} (or the one before) to"),
    )

  def _no_space(self, what: str) -> str:
    last = (saved_steps(os.path.dirname(self.directory)) or ["none"])[-1]
    return (
      f"{what} {self.directory}; the last complete checkpoint is {last}. "
      "Free space (or move the workdir) and re-run the same command to resume from it."
    )


def selection_key(metrics: dict) -> tuple:
  """The order of evaluated checkpoints (higher is better): the score (the selection metric
  signed so that higher is better), then the lower validation loss (NaN or none: worst), then
  the EARLIER step."""
  loss = metrics.get("val_loss")
  loss = math.inf if loss is None or not math.isfinite(loss) else loss
  return (metrics["score"], -loss, -metrics.get("step", 0))


def saved_steps(workdir: str) -> list[int]:
  """The complete checkpoints of a run's workdir, from the file system (orbax renames a
  finished checkpoint to its plain step number): readable before any manager writes there."""
  directory = layout.path(workdir, layout.CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def space_problem(directory: str, nbytes: int) -> str | None:
  """Why ``nbytes`` of checkpoint cannot be written in ``directory`` (free space with 10% + 16 MB
  to spare, or the process's file-size limit), else None. Checked before orbax writes anything,
  so a full disk stops the run cleanly instead of failing in orbax's background threads."""
  folder = directory
  while not os.path.isdir(folder):
    folder = os.path.dirname(folder)
  free = shutil.disk_usage(folder).free
  if nbytes * 1.1 + 16 * 2**20 > free:
    return f"no space left on device ({nbytes / 2**20:.1f} MB needed, {free / 2**20:.1f} MB free)"
  limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
  if limit != resource.RLIM_INFINITY and nbytes > limit:
    return f"file too large (a file-size limit of {limit} bytes; {nbytes} bytes needed)"
  return None


@dataclasses.dataclass
class Inference:
  """A restored model for evaluation and explanation."""

  config: Any
  model: Any
  variables: Any  # {'params', 'batch_stats'}, replicated over `mesh`
  step: int
  mesh: Any
  # The checkpoint's record (`loop.checkpoint_meta`), with the run's status at its end.
  meta: dict = dataclasses.field(default_factory=dict)


def load_for_inference(workdir: str, which: str | int = "best") -> Inference:
  """Rebuild the model of ``<workdir>/config.json`` and restore a checkpoint's variables."""
  from divisive_jax import state as state_lib

  if problem := layout.not_one_run(workdir):
    raise WorkdirError(problem)
  config = config_base.load(workdir)
  mesh = sharding.make_mesh()
  ckpts = Checkpoints(workdir, async_save=False)
  try:
    step = ckpts.resolve(which)
    model, target = state_lib.abstract_variables(config, mesh)
    variables = ckpts.restore_variables(step, target)
    latest = ckpts.latest_step()  # the run's status is its latest record's
    meta = dict(ckpts.meta(step), status=layout.Status.of(ckpts.meta(latest)).to_json())
  finally:
    ckpts.close()
  return Inference(config=config, model=model, variables=variables, step=step, mesh=mesh, meta=meta)
