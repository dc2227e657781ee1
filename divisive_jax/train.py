"""The training job: init or resume, steps, evaluation cadence, logging, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job; its loop body is a few local closures
(`_fetch`, `_log`, `_evaluate`, `_checkpoint`). Metrics of a step are fetched after the next
step is dispatched and written by process 0; checkpoints are saved by all processes (orbax
coordinates the sharded write).

Before the first step: the config is validated, the workdir locked (`workdir.Lock`) and, when
resuming, compared with the stored config (`workdir.check_config`); pretrained weights are read
and matched against the model; the data are prepared; `preflight` refuses runs that cannot mean
anything. Resuming restores the newest checkpoint (state + data position) and continues; the data
stream is a pure function of (seed, global step), so a resumed run sees exactly the batches an
uninterrupted run would. SIGTERM saves a checkpoint and exits; SIGKILL loses at most the steps
since the last checkpoint. A non-finite loss stops the run with the last good checkpoint intact.
At the end the best checkpoint is evaluated on val and test with the splits and the compiled
eval step already in memory (`evaluation.evaluate_checkpoint`).
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging

from divisive_jax import checkpoints as ckpt_lib
from divisive_jax import config_base, evaluation, jsonio, losses, multihost, preflight
from divisive_jax import feed, loop, preprocess, sharding, writers
from divisive_jax import state as state_lib
from divisive_jax import step as step_lib
from divisive_jax import workdir as workdir_lib
from divisive_jax import data as data_lib
from divisive_jax.errors import NonFiniteLossError, WorkdirError
from divisive_jax.evaluators import CamImages, Context, PadEvaluator


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Train (or resume) in ``workdir``; returns the last validation metrics."""
  writers.quiet_library_logs()
  logging.info(data_lib.describe(config.data))  # first line, before JAX starts its backend
  config_base.validate(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.exclusive(workdir):
    return _train(config, workdir, allow_config_change)


def _train(config, workdir: str, allow_config_change: bool) -> dict:
  lead = multihost.is_lead()
  logging.info(
    "JAX process %d/%d, %d local / %d global devices (%s); workdir %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
    workdir,
  )
  batch_size = int(config.batch_size)
  if batch_size % jax.device_count():
    raise WorkdirError(
      f"config.batch_size={batch_size} must be divisible by the number of devices "
      f"({jax.device_count()}); e.g. --config.batch_size="
      f"{max(1, batch_size // jax.device_count()) * jax.device_count()}"
    )
  # Before any data work: is this workdir's checkpoint this experiment's? Are the weights good?
  ckpts = ckpt_lib.Checkpoints(workdir)
  latest = ckpts.latest_step()
  workdir_lib.check_config(workdir, config, latest is not None, allow_config_change, latest)
  pretrained = (
    None if latest is not None else state_lib.read_pretrained(config, sharding.make_mesh())
  )
  preflight.check_config(config)
  splits = data_lib.load_splits_once(config.data, workdir)
  logging.info("Data: %s", splits.info["description"])
  preflight.check_splits(config, splits)

  steps_per_epoch, total_steps = state_lib.schedule_lengths(config, len(splits.train))
  class_weights = None
  if config.loss.class_weights == "balanced":
    class_weights = losses.balanced_class_weights(splits.train.label, 2)
    logging.info("Balanced class weights: %s", class_weights)
  setup = state_lib.build(config, steps_per_epoch, total_steps, class_weights)
  mesh = setup.mesh
  if lead:
    jsonio.write_text(os.path.join(workdir, "config.json"), config_base.to_json(config) + "\n")
    jsonio.write_json(os.path.join(workdir, "data_info.json"), splits.info)
  inputs = preprocess.from_config(config.data)
  train_step = step_lib.make_train_step(setup.model, setup.loss_cfg, setup.tx, mesh, inputs)
  eval_step = step_lib.make_eval_step(
    setup.model, mesh, config.loss.cam_kind, config.loss.cam_relu, inputs
  )
  writer = writers.MetricWriter(workdir, enabled=lead)

  state = state_lib.create_state(setup, config.seed, pretrained)
  start, best = 0, loop.Best()  # for early stopping (resumed below)
  if latest is not None:
    state, meta = ckpts.restore(latest, state)  # the loss weights stay the config's
    start = int(meta["step"])
    best = loop.Best(meta["best_score"], meta["evals_since_best"])
    if meta["early_stopped"]:
      total_steps = start  # the run had finished by early stopping: nothing left to train
    writer.truncate_after(start)
  else:
    writer.truncate_after(0)
    from clu import parameter_overview

    if lead:
      jsonio.write_text(
        os.path.join(workdir, "parameters.txt"),
        parameter_overview.get_parameter_overview(state.params) + "\n",
      )
    n_params = parameter_overview.count_parameters(state.params)
    logging.info(
      "Model %s: %s parameters (table in parameters.txt)", config.model.name, f"{n_params:,}"
    )
  if start >= total_steps:
    logging.info(
      "The run in %s is complete (step %d of %d): nothing to train; re-evaluating "
      "its best checkpoint.",
      workdir,
      start,
      total_steps,
    )
  else:
    if start:
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpts.directory)
    logging.info(
      "Training %d steps (%d per epoch, global batch %d) on %d device(s), %d process(es)",
      total_steps,
      steps_per_epoch,
      batch_size,
      jax.device_count(),
      jax.process_count(),
    )

  cadence = loop.Cadence.from_config(config, steps_per_epoch, total_steps)
  eval_batch = evaluation.eval_batch_size(config)
  patience = int(config.early_stop_patience)
  sign = 1.0 if config.best_mode == "max" else -1.0
  ctx = Context("val", tuple(splits.class_names), tuple(splits.attack_types), config.task)

  k_max = int(config.steps_per_dispatch)
  if config.data.on_device:
    resident = feed.ResidentData(splits.train, mesh, batch_size, config_base.shuffle_seed(config))
    logging.info(
      "Training split on the device(s): %.1f MB; %d step(s) per dispatch",
      resident.nbytes / 2**20,
      k_max,
    )
    multi_step = step_lib.make_train_steps(setup.model, setup.loss_cfg, setup.tx, mesh, inputs)
    batches = None
  else:
    resident = None
    batches = feed.host_batches(config, splits.train, mesh, start)
  progress = writers.Progress(start, total_steps)
  window, val = [], {}
  t_window = time.time()

  def _dispatch(step):
    """Run the next dispatch from ``step``: k steps on resident data, else one step."""
    nonlocal state
    if resident is None:
      state, m = train_step(state, next(batches))
      return 1, m
    k = cadence.dispatch(step, k_max)  # events land on exact steps
    state, m = multi_step(state, resident.arrays, resident.indices(step, k))
    return k, m

  def _fetch(entry):
    """A dispatch's metrics as floats, step by step; stop on a non-finite loss or params."""
    done, k, m = entry
    m = {key: np.asarray(v, np.float64).reshape(-1) for key, v in jax.device_get(m).items()}
    for i in range(k):
      row = {key: float(v[i]) for key, v in m.items()}
      if not (math.isfinite(row["loss"]) and row["finite"] == 1.0):
        _stop_non_finite(done - k + 1 + i, row)
      row.pop("finite")
      window.append(row)

  def _stop_non_finite(s, row):
    ckpts.wait()
    last = ckpts.latest_step()
    writer.truncate_after(last or 0)  # this run's records after its last checkpoint go
    parts = {key: v for key, v in row.items() if key.startswith("loss/")}
    where = (
      f"The last good checkpoint (step {last}) in {ckpts.directory} is intact; re-run to "
      "resume from it"
      if last is not None
      else "No checkpoint was saved before it, so re-running starts from scratch"
    )
    raise NonFiniteLossError(
      f"non-finite loss or parameters (loss {row['loss']}) at step {s}; parts: {parts}. "
      f"{where} after lowering config.optim.lr or the saliency weights."
    )

  def _log(done, step):
    nonlocal window, t_window
    scalars = {key: float(np.mean([w[key] for w in window])) for key in window[0]}
    scalars["lr"] = float(setup.schedule(step))
    scalars["steps_per_s"] = len(window) / max(time.time() - t_window, 1e-9)
    window, t_window = [], time.time()
    writer.write_scalars(done, scalars)
    progress.log(done, scalars)

  def _evaluate(done):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    pad, images = PadEvaluator(ctx), CamImages(ctx)
    evaluation.run_split(eval_step, variables, splits.val, mesh, eval_batch, [pad, images])
    result = {**pad.validation_metrics(), "epoch": done / steps_per_epoch}
    score = sign * result[config.best_metric]
    best.update(score)
    writer.write_scalars(done, result)
    writer.write_images(done, images.images)
    progress.log(done, result)
    return result, score

  def _checkpoint(done, score, early):
    meta = loop.checkpoint_meta(done, steps_per_epoch, best, val, early_stopped=early)
    ckpts.save(done, state, meta, score=score)

  pending, failed, step = None, True, start
  stop = loop.StopSignal()
  try:
    with stop:
      while step < total_steps:
        k, m = _dispatch(step)
        if pending is not None:
          _fetch(pending)
        done = step + k
        pending = (done, k, m)
        if cadence.logs(done):
          _fetch(pending)
          pending = None
          _log(done, done - 1)
        elif progress.due():
          progress.log(done, {"loss": float(np.asarray(m["loss"]).reshape(-1)[-1])})
        is_eval, score = cadence.evaluates(done), None
        if is_eval:
          if pending is not None:
            _fetch(pending)
            pending = None
          val, score = _evaluate(done)
        early = is_eval and best.patience_over(patience)
        stopping = (cadence.logs(done) or cadence.checkpoints(done)) and stop.requested()
        if cadence.checkpoints(done) or stopping:
          if pending is not None:
            _fetch(pending)
            pending = None
          _checkpoint(done, score, early)
        writer.flush()
        step = done
        if stopping:
          logging.warning(
            "Received signal %s: saved the checkpoint at step %d; exiting. Re-run the same "
            "command to resume.",
            stop.signal,
            done,
          )
          break
        if early:
          logging.info(
            "Early stop at step %d: %s has not improved for %d evaluations.",
            done,
            config.best_metric,
            patience,
          )
          break
      if pending is not None:
        _fetch(pending)
      ckpts.wait()
      failed = False
  finally:
    if batches is not None:
      batches.close()
    if resident is not None:
      resident.close()
    writer.close()
    if failed:
      ckpts.close_quietly()

  try:
    if stop.signal is None and config.final_eval:
      results = evaluation.final_evaluation(config, workdir, splits, setup, ckpts, state, eval_step)
      if lead:
        logging.info(evaluation.summary_text(workdir, results))
  finally:
    ckpts.close()
  return val
