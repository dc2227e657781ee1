"""The training job: one run, or a population of N runs in one program; both the same loop.

`train_and_evaluate(config, workdir)` is the whole job; its loop body is a few local closures
(`_fetch`, `_log`, `_evaluate`, `_checkpoint`). A single run is a population of one member
(`members`): the members' workdirs, their per-member liveness and the member axis of the state
are properties of this one loop. With one member the compiled step is one run's program (no
member axis); with several it is the same body over a leading member axis (`step`: vmapped on
accelerators, unrolled on CPU), seeds and loss weights being runtime values, so the population
compiles once whatever its weights.

Before the first step: the config is validated, the workdir locked (`workdir.Lock`) and, when
resuming, compared with the stored config (`workdir.check_config`); the batch size is checked
against the devices; pretrained weights are read and matched against the model; the data are
prepared; `preflight` refuses runs that cannot mean anything. Resuming restores every member's
newest common checkpoint (state + data position) and continues; the data stream is a pure
function of (seed, global step), so a resumed run sees exactly the batches an uninterrupted run
would. Metrics of a dispatch are fetched after the next is dispatched and written by process 0;
checkpoints are saved by all processes (orbax coordinates the sharded write). SIGTERM (agreed
across processes) saves a checkpoint and exits; SIGKILL loses at most the steps since the last
checkpoint.

A member whose loss or parameters become non-finite is frozen at its last finite state (on the
device) and the others go on; a run of one member stops with the last good checkpoint intact.
Early stopping freezes a member likewise. The job ends when the steps are done or every member is
frozen; then each member's best checkpoint is evaluated on val and test with the splits and the
compiled eval step already in memory, and written to its ``result.json``.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging

from divisive_jax import checkpoints as ckpt_lib
from divisive_jax import config_base, jsonio, losses, loop, multihost, preflight, preprocess
from divisive_jax import members as members_lib
from divisive_jax import sharding, writers
from divisive_jax import state as state_lib
from divisive_jax import step as step_lib
from divisive_jax import workdir as workdir_lib
from divisive_jax import data as data_lib
from divisive_jax.errors import NonFiniteLossError
from divisive_jax.evaluators import CamImages, Context, PadEvaluator
from divisive_jax.evaluators import common as evaluation


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Train (or resume) the run -- or every member of ``config.population`` -- in ``workdir``;
  returns {member name: its ``result.json`` dict} (empty without a final evaluation)."""
  writers.quiet_library_logs()
  logging.info(data_lib.describe(config.data))  # first line, before JAX starts its backend
  config_base.validate(config)
  members = members_lib.members_of(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.exclusive(workdir):
    return _train(config, workdir, members, allow_config_change)


def _train(config, workdir: str, members, allow_config_change: bool) -> dict:
  lead, n = multihost.is_lead(), len(members)
  logging.info(
    f"JAX process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local "
    f"/ {jax.device_count()} global devices ({jax.devices()[0].platform}); workdir {workdir}"
  )
  workdir_lib.check_kind(workdir, "population" if members_lib.is_population(config) else "run")
  preflight.check_devices(config)
  # Before any data work: is this workdir's checkpoint this experiment's? Are the weights good?
  dirs = members_lib.workdirs(config, workdir, members)
  ckpts = [ckpt_lib.Checkpoints(d, keep_latest=1 if n == 1 else 2, writer=True) for d in dirs]
  latest = ckpt_lib.common_step(ckpts)
  workdir_lib.check_config(workdir, config, latest is not None, allow_config_change, latest)
  for m, c in zip(members, ckpts) if latest is not None else ():
    if newer := c.discard_after(latest):  # a kill while the members saved: redone from latest
      logging.info(f"Member {m.name}: checkpoint(s) {newer} after the common step {latest} redone")
  mesh = sharding.make_mesh()
  pretrained = None if latest is not None else state_lib.read_pretrained(config, mesh)
  union = members_lib.union_config(config, members)
  preflight.check_config(union)
  splits = data_lib.load_splits_once(config.data, workdir)
  logging.info("Data: %s", splits.info["description"])
  preflight.check_splits(config, splits)

  steps_per_epoch, total_steps = state_lib.schedule_lengths(config, len(splits.train))
  class_weights = None
  if config.loss.class_weights == "balanced":
    class_weights = losses.balanced_class_weights(splits.train.label, 2)
    logging.info("Balanced class weights: %s", class_weights)
  setup = state_lib.build(union, steps_per_epoch, total_steps, class_weights)
  if lead:
    _write_configs(config, workdir, members, dirs, splits.info)
  out = [writers.MetricWriter(d, enabled=lead) for d in dirs]

  weights = [{t: float(m.config.loss.weights[t]) for t in setup.loss_cfg.names} for m in members]
  state = state_lib.create_states(setup, [m.seed for m in members], weights, pretrained)
  best, frozen, start = [loop.Best() for _ in members], [""] * n, latest or 0
  if latest is not None:
    state, metas = _restore(ckpts, latest, state, mesh)
    best = [loop.Best(m["best_score"], m["evals_since_best"]) for m in metas]
    frozen = [m.get("frozen") or ("early stop" if m["early_stopped"] else "") for m in metas]
  else:
    _write_parameters(config, state, dirs, lead)
  for w in out:
    w.truncate_after(start)
  plural = "" if n == 1 else "s"
  if start >= total_steps or all(frozen):
    logging.info(
      f"The run in {workdir} is complete (step {start} of {total_steps}): nothing to train; "
      f"re-evaluating its best checkpoint{plural}."
    )
  else:
    if start:
      logging.info(f"Resuming from the checkpoint{plural} at step {start} in {workdir}")
    together = f"; {n} members in one program: {', '.join(m.name for m in members)}"
    logging.info(
      f"Training {total_steps} steps ({steps_per_epoch} per epoch, global batch "
      f"{config.batch_size}) on {jax.device_count()} device(s), {jax.process_count()} "
      f"process(es){together if n > 1 else ''}"
    )

  cadence = loop.Cadence.from_config(config, steps_per_epoch, total_steps)
  eval_batch = evaluation.eval_batch_size(config)
  patience = int(config.early_stop_patience)
  sign = 1.0 if config.best_mode == "max" else -1.0
  ctx = Context("val", tuple(splits.class_names), tuple(splits.attack_types), config.task)
  inputs, strategy = preprocess.from_config(config.data), config.population.strategy
  loss = config.loss
  eval_step = step_lib.make_eval_step(
    setup.model, mesh, loss.cam_kind, loss.cam_relu, inputs, n, strategy
  )
  dispatch = loop.Dispatcher.for_training(setup, members, splits.train, start, cadence)
  if config.data.on_device:
    mb, k = dispatch.source.nbytes / 2**20, config.steps_per_dispatch
    logging.info(f"Training split on the device(s): {mb:.1f} MB; {k} step(s) per dispatch")
  for i in [i for i in range(n) if frozen[i] and n > 1]:
    dispatch.freeze(i)
  progress = writers.Progress(start, total_steps)
  windows, val, t_window = [[] for _ in members], [{} for _ in members], time.time()

  def _fetch(entry):
    """A dispatch's metrics as floats, step by step and member by member; a non-finite member
    is frozen (already on the device), a run of one member stops."""
    done, k, m = entry
    m = {key: np.asarray(v, np.float64).reshape(k, n) for key, v in jax.device_get(m).items()}
    m.pop("live", None)
    for j in range(k):
      for i in range(n):
        if frozen[i]:
          continue
        row = {key: float(v[j, i]) for key, v in m.items()}
        if not (math.isfinite(row["loss"]) and row.pop("finite") == 1.0):
          if n == 1:
            _stop_non_finite(done - k + 1 + j, row)
          frozen[i] = f"non-finite loss or parameters at step {done - k + 1 + j}"
          logging.warning(f"Member {members[i].name}: {frozen[i]}; frozen, the others go on")
          continue
        windows[i].append(row)

  def _stop_non_finite(s, row):
    (c,) = ckpts
    c.wait()
    last = c.latest_step()
    out[0].truncate_after(last or 0)  # this run's records after its last checkpoint go
    parts = {key: v for key, v in row.items() if key.startswith("loss/")}
    where = (
      f"The last good checkpoint (step {last}) in {c.directory} is intact; re-run to resume from it"
      if last is not None
      else "No checkpoint was saved before it, so re-running starts from scratch"
    )
    raise NonFiniteLossError(
      f"non-finite loss or parameters (loss {row['loss']}) at step {s}; parts: {parts}. "
      f"{where} after lowering config.optim.lr or the saliency weights."
    )

  def _log(done):
    nonlocal t_window
    seconds, shown = max(time.time() - t_window, 1e-9), []
    for i, w in enumerate(windows):
      if w:
        scalars = {key: float(np.mean([r[key] for r in w])) for key in w[0]}
        scalars["lr"] = float(setup.schedule(done - 1))
        scalars["steps_per_s"] = len(w) / seconds
        out[i].write_scalars(done, scalars)
        shown.append(scalars)
      windows[i] = []
    t_window = time.time()
    progress.log(done, _mean(shown))
    live = n - sum(map(bool, frozen))
    if live < n:
      logging.info("%d of %d members active", live, n)

  def _evaluate(done):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    groups = [[PadEvaluator(ctx), CamImages(ctx)] for _ in members]
    evaluation.run_split(
      eval_step, variables, splits.val, mesh, eval_batch, groups if n > 1 else groups[0], n > 1
    )
    scores, shown = [None] * n, []
    for i, (pad, images) in enumerate(groups):
      if frozen[i]:
        continue
      val[i] = {**pad.validation_metrics(), "epoch": done / steps_per_epoch}
      scores[i] = sign * val[i][config.best_metric]
      best[i].update(scores[i])
      out[i].write_scalars(done, val[i])
      out[i].write_images(done, images.images)
      shown.append(val[i])
      if best[i].patience_over(patience):
        frozen[i] = f"early stop at step {done}"
        if n > 1:
          dispatch.freeze(i)
        who = f" of member {members[i].name}" if n > 1 else ""
        logging.info(
          f"Early stop{who} at step {done}: {config.best_metric} has not improved for "
          f"{patience} evaluations."
        )
    progress.log(done, _mean(shown))
    return scores

  def _checkpoint(done, scores):
    if n > 1:  # every member's previous checkpoint is complete before any member writes the next
      for c in ckpts:
        c.wait()
    states = [state] if n == 1 else state_lib.unstack(state, n)
    for i, c in enumerate(ckpts):
      meta = loop.checkpoint_meta(
        done,
        steps_per_epoch,
        best[i],
        val[i],
        early_stopped=frozen[i].startswith("early"),
        frozen=frozen[i],
      )
      c.save(done, states[i], meta, score=scores[i])

  pending, failed, step, saved = None, True, start, start
  stop = loop.StopSignal()
  try:
    with stop:
      while step < total_steps and not all(frozen):
        state, k, m = dispatch(state, step)
        if pending is not None:
          _fetch(pending)
        done = step + k
        pending = (done, k, m)
        if cadence.logs(done):
          _fetch(pending)
          pending = None
          _log(done)
        elif progress.due():
          progress.log(done, {"loss": float(np.nanmean(np.asarray(m["loss"]).reshape(k, n)[-1]))})
        scores = [None] * n
        if cadence.evaluates(done):
          if pending is not None:
            _fetch(pending)
            pending = None
          scores = _evaluate(done)
        stopping = (cadence.logs(done) or cadence.checkpoints(done)) and stop.requested()
        if cadence.checkpoints(done) or stopping:
          if pending is not None:
            _fetch(pending)
            pending = None
          _checkpoint(done, scores)
          saved = done
        for w in out:
          w.flush()
        step = done
        if stopping:
          logging.warning(
            f"Received signal {stop.signal}: saved the checkpoint{plural} at step {done}; "
            "exiting. Re-run the same command to resume."
          )
          break
      if pending is not None:
        _fetch(pending)
      if all(frozen) and saved < step:  # every member frozen between checkpoints: record it
        _checkpoint(step, [None] * n)
      for c in ckpts:
        c.wait()
      failed = False
  finally:
    dispatch.close()
    for w in out:
      w.close()
    if failed:
      for c in ckpts:
        c.close_quietly()

  results = {}
  try:
    if stop.signal is None and config.final_eval:
      results = _final_evaluation(setup, members, dirs, splits, ckpts, state, eval_step, frozen)
  finally:
    for c in ckpts:
      c.close()
  return results


def _mean(rows: list[dict]) -> dict:
  """The members' figures averaged for the console (one member: its own)."""
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _write_configs(config, workdir, members, dirs, info) -> None:
  jsonio.write_text(os.path.join(workdir, "config.json"), config_base.to_json(config) + "\n")
  jsonio.write_json(os.path.join(workdir, "data_info.json"), info)
  if dirs != [workdir]:
    for m, d in zip(members, dirs):
      os.makedirs(d, exist_ok=True)
      jsonio.write_text(os.path.join(d, "config.json"), config_base.to_json(m.config) + "\n")
      jsonio.write_json(os.path.join(d, "data_info.json"), info)


def _write_parameters(config, state, dirs, lead: bool) -> None:
  """Every member's ``parameters.txt`` (clu's table: names, shapes, sizes, statistics)."""
  from clu import parameter_overview

  n = len(dirs)
  params = state.params
  if lead:
    for d, member in zip(dirs, [params] if n == 1 else state_lib.unstack(params, n)):
      jsonio.write_text(
        os.path.join(d, "parameters.txt"),
        parameter_overview.get_parameter_overview(member) + "\n",
      )
  count = parameter_overview.count_parameters(params) // n
  logging.info("Model %s: %s parameters (table in parameters.txt)", config.model.name, f"{count:,}")


def _restore(ckpts, step: int, state, mesh):
  """Every member's checkpoint at ``step`` into ``state`` (the members stacked again)."""
  if len(ckpts) == 1:
    restored, meta = ckpts[0].restore(step, state)
    return restored, [meta]
  targets = state_lib.unstack(state, len(ckpts))
  restored, metas = zip(*(c.restore(step, t) for c, t in zip(ckpts, targets)))
  return state_lib.stack(restored, sharding.replicated(mesh)), list(metas)


def _final_evaluation(setup, members, dirs, splits, ckpts, state, eval_step, frozen) -> dict:
  """Each member's best checkpoint on val and test, with the splits and one compiled eval step
  in memory (and the member's state, when the best checkpoint is its last): its eval files,
  ``result.json`` and closing lines."""
  n, results = len(members), {}
  if n > 1:
    c = setup.config
    loss, inputs = c.loss, preprocess.from_config(c.data)
    eval_step = step_lib.make_eval_step(
      setup.model, setup.mesh, loss.cam_kind, loss.cam_relu, inputs
    )
  states = [state] if n == 1 else state_lib.unstack(state, n)
  for i, m in enumerate(members):
    best = ckpts[i].resolve("best")
    variables = {"params": states[i].params, "batch_stats": states[i].batch_stats}
    if best != int(jax.device_get(states[i].step)):
      _, target = state_lib.abstract_variables(m.config, setup.mesh)
      variables = ckpts[i].restore_variables(best, target)
    inf = ckpt_lib.Inference(m.config, setup.model, variables, best, setup.mesh)
    ev = evaluation.evaluate_checkpoint(dirs[i], splits, inf, "best", eval_step=eval_step)
    results[m.name] = members_lib.result(m, ev, frozen[i])
    if multihost.is_lead():
      jsonio.write_json(os.path.join(dirs[i], "result.json"), results[m.name])
      logging.info(evaluation.summary_text(dirs[i], ev))
  multihost.sync("results written")
  return results
