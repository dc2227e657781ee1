"""The training loop: init or resume, steps, evaluation cadence, logging, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job. Data flows one way: the input pipeline
gives host-local batches, the jitted shard_map step consumes them, metrics are fetched one step
late (after the next step is dispatched) and written by process 0, checkpoints are saved by all
processes (orbax coordinates the sharded write).

Resuming: re-running on a workdir restores the newest checkpoint (state + data position) and
continues; the data stream is a pure function of (seed, global step), so a resumed run sees
exactly the batches an uninterrupted run would. SIGTERM saves a checkpoint and exits; SIGKILL
loses at most the steps since the last checkpoint. A non-finite loss stops the run with the last
good checkpoint intact.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from divisive_jax import checkpoints as ckpt_lib
from divisive_jax import data as data_lib
from divisive_jax import losses, metrics, models, optim, step as step_lib, writers
from divisive_jax.data import pipeline


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------------------ model & state
def input_shape(config) -> tuple[int, int, int, int]:
  return (1, int(config.data.image_size), int(config.data.image_size), int(config.data.channels))


def loss_config(config, class_weights=None) -> losses.LossConfig:
  return losses.from_config(config.loss, class_weights)


def _schedule_lengths(config, num_train: int) -> tuple[int, int]:
  steps_per_epoch = max(1, num_train // int(config.batch_size))
  total = int(config.get("num_train_steps", 0)) or int(config.num_epochs) * steps_per_epoch
  return steps_per_epoch, total


def abstract_state(config, steps_per_epoch: int = 1, total_steps: int = 1):
  """(model, abstract TrainState with replicated shardings, mesh) — no computation."""
  mesh = step_lib.make_mesh()
  model = models.get_model(config.model, bn_axis_name=step_lib.AXIS)
  tx, _ = optim.make_optimizer(config.optim, steps_per_epoch, total_steps)
  state = jax.eval_shape(
    functools.partial(_init_state, model, tx, input_shape(config)), jax.random.key(0)
  )
  rep = step_lib.replicated(mesh)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state)
  return model, state, mesh


def _init_state(model, tx, shape, rng):
  init_key, loss_key = jax.random.split(rng)
  variables = model.init(init_key, jnp.zeros(shape, jnp.float32), train=False)
  params = variables["params"]
  return step_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(loss_key),
  )


def create_state(config, model, tx, mesh):
  """Fresh replicated TrainState (optionally with pretrained backbone weights)."""
  init = jax.jit(
    functools.partial(_init_state, model, tx, input_shape(config)),
    out_shardings=step_lib.replicated(mesh),
  )
  state = init(jax.random.key(int(config.seed)))
  path = config.model.get("pretrained_path", "")
  if path:
    from divisive_jax.models import torchvision as tv

    variables = tv.load_torchvision_state_dict(
      path, config.model, {"params": state.params, "batch_stats": state.batch_stats}
    )
    params = jax.device_put(variables["params"], step_lib.replicated(mesh))
    state = state.replace(
      params=params,
      batch_stats=jax.device_put(variables["batch_stats"], step_lib.replicated(mesh)),
      opt_state=jax.jit(tx.init)(params),
    )
    logging.info("Loaded pretrained weights from %s", path)
  return state


# ---------------------------------------------------------------------------------- evaluation
def run_split(eval_step, state, source, mesh, global_batch_size: int, on_batch=None) -> dict:
  """Every example of `source` exactly once (last batch padded and masked).

  Returns per-example numpy arrays (valid rows only, dataset order): score, pred, ce, label,
  attack_type, has_saliency, id. `on_batch(host_batch, outputs)` sees each batch's valid rows
  (outputs include the raw class maps (n, 2, h, w)).
  """
  keep = ("score", "pred", "ce")
  rows = {k: [] for k in keep + ("label", "attack_type", "has_saliency", "id")}
  for local in pipeline.eval_batches(
    source, global_batch_size, process_index=jax.process_index(), process_count=jax.process_count()
  ):
    out = eval_step(state, step_lib.to_global(local, mesh))
    out = {k: step_lib.to_host(v) for k, v in out.items()}
    host = _global_host_batch(local)
    valid = out["valid"] > 0
    for k in keep:
      rows[k].append(out[k][valid])
    for k in ("label", "attack_type", "has_saliency", "id"):
      rows[k].append(np.asarray(host[k])[valid])
    if on_batch is not None:
      on_batch(
        {k: np.asarray(v)[valid] for k, v in host.items()}, {k: v[valid] for k, v in out.items()}
      )
  return {k: np.concatenate(v) for k, v in rows.items()}


def _global_host_batch(local: dict) -> dict:
  """The host-side fields of the global batch (all processes' rows, in global order)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.dtype.kind in "USO":  # strings: gather as fixed-width bytes
      width = 64
      enc = np.array([s.encode()[:width].ljust(width, b"\0") for s in v.astype(str)])
      codes = np.frombuffer(enc.tobytes(), np.uint8).reshape(len(v), width)
      allc = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
      out[k] = np.array([bytes(r).rstrip(b"\0").decode() for r in allc])
    else:
      out[k] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
  return out


def validation_metrics(result: dict) -> dict:
  labels, scores = result["label"], result["score"]
  return {
    "val/accuracy": float(np.mean(result["pred"] == labels)),
    "val/auroc": float(metrics.auroc(labels, scores)),
    "val/loss": float(np.mean(result["ce"])),
  }


def _overlay_images(host_batch, outputs, max_images: int = 4) -> dict:
  """TensorBoard panels: image | true-class CAM overlay | human map overlay."""
  from divisive_jax import plots
  from divisive_jax import cams as cams_lib

  images = {}
  for i in range(min(max_images, len(host_batch["label"]))):
    img = host_batch["image"][i]
    cam = np.asarray(cams_lib.normalize(jnp.asarray(outputs["maps"][i, host_batch["label"][i]])))
    panels = [plots.overlay(img, np.zeros(img.shape[:2]), alpha=0.0), plots.overlay(img, cam, 0.5)]
    if host_batch["has_saliency"][i] > 0:
      panels.append(plots.overlay(img, host_batch["saliency"][i], 0.5))
    images[f"val_cam/{i}"] = np.concatenate(panels, axis=1)
  return images


# ------------------------------------------------------------------------------------ the job
def describe_data(data_config) -> str:
  """The run's first log line: which data it trains on."""
  if data_config.get("csv_path", ""):
    return (
      f"Training on CSV-protocol data {data_config.csv_path} (images {data_config.image_dir},"
      f" maps {data_config.get('map_dir', '') or 'none'}, classes "
      f"{tuple(data_config.class_names)})."
    )
  return (
    f"Training on the built-in synthetic '{data_config.builtin}' set: no data paths given "
    "(set --config.data.csv_path, --config.data.image_dir and --config.data.map_dir to "
    "train on your own data)."
  )


def _best_score(config, val: dict) -> float:
  value = val[config.best_metric]
  return value if config.get("best_mode", "max") == "max" else -value


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (or resume) in `workdir`; returns the last validation metrics."""
  logging.info(describe_data(config.data))  # first line, before JAX starts its backend
  os.makedirs(workdir, exist_ok=True)
  writers.quiet_library_logs()
  lead = jax.process_index() == 0
  logging.info(
    "JAX process %d/%d, %d local / %d global devices (%s); workdir %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
    workdir,
  )
  splits = _load_splits(config, workdir)
  logging.info("Data: %s", splits.info.get("description", ""))
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "data_info.json"), "w") as f:
      json.dump(splits.info, f, indent=2, default=str)

  batch_size = int(config.batch_size)
  if batch_size % jax.device_count():
    raise ValueError(
      f"config.batch_size={batch_size} must be divisible by the number of "
      f"devices ({jax.device_count()}); e.g. --config.batch_size="
      f"{max(1, batch_size // jax.device_count()) * jax.device_count()}"
    )
  steps_per_epoch, total_steps = _schedule_lengths(config, len(splits.train))
  class_weights = None
  if config.loss.get("class_weights", "none") == "balanced":
    class_weights = losses.balanced_class_weights(_labels(splits.train), 2)
    logging.info("Balanced class weights: %s", class_weights)
  cfg = loss_config(config, class_weights)

  mesh = step_lib.make_mesh()
  model = models.get_model(config.model, bn_axis_name=step_lib.AXIS)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch, total_steps)
  train_step = step_lib.make_train_step(model, cfg, tx, mesh)
  eval_step = step_lib.make_eval_step(model, cfg, mesh)

  ckpts = ckpt_lib.Checkpoints(workdir)
  writer = writers.MetricWriter(workdir, enabled=lead)
  state = create_state(config, model, tx, mesh)
  start = 0
  best = {"score": -math.inf, "stale": 0}  # for early stopping (resumed from the checkpoint)
  patience = int(config.get("early_stop_patience", 0))
  latest = ckpts.latest_step()
  if latest is not None:
    state, meta = ckpts.restore(latest, state)
    start = int(meta["step"])
    best = {"score": meta.get("best_score", -math.inf), "stale": meta.get("evals_since_best", 0)}
    if meta.get("early_stopped"):
      total_steps = start  # the run had finished by early stopping: nothing left to train
    writer.truncate_after(start)
    logging.info("Resuming from the checkpoint at step %d in %s", start, ckpts.directory)
  else:
    from clu import parameter_overview

    if lead:
      with open(os.path.join(workdir, "parameters.txt"), "w") as f:
        f.write(parameter_overview.get_parameter_overview(state.params) + "\n")
    logging.info(
      "Model %s: %s parameters (table in parameters.txt)",
      config.model.name,
      f"{parameter_overview.count_parameters(state.params):,}",
    )
  logging.info(
    "Training %d steps (%d per epoch, global batch %d) on %d device(s), %d process(es)",
    total_steps,
    steps_per_epoch,
    batch_size,
    jax.device_count(),
    jax.process_count(),
  )

  eval_every = int(config.get("eval_every_steps", 0)) or max(
    1, int(round(float(config.get("eval_every_epochs", 1.0)) * steps_per_epoch))
  )
  ckpt_every = int(config.get("checkpoint_every_steps", 0)) or eval_every
  log_every = max(1, int(config.get("log_every_steps", 50)))
  eval_batch = int(config.get("eval_batch_size", 0)) or batch_size

  stop = {"signal": None}

  def on_sigterm(signum, frame):
    stop["signal"] = signum

  previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None

  batches = pipeline.train_batches(
    splits.train,
    batch_size,
    seed=int(config.seed),
    start_step=start,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    flip=bool(config.data.get("augment_flip", False)),
    crop=int(config.data.get("augment_crop", 0)),
  )
  progress = writers.Progress(start, total_steps)
  window, pending, val = [], None, {}
  t_window = time.time()

  def fetch(entry):
    """Fetch a dispatched step's metrics; stop on a non-finite loss."""
    s, m = entry
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not (math.isfinite(m["loss"]) and m["finite"] == 1.0):
      ckpts.wait()
      raise NonFiniteLossError(
        f"non-finite loss or parameters (loss {m['loss']}) at step {s}; parts: "
        f"{ {k: v for k, v in m.items() if k.startswith('loss/')} }. The last good checkpoint "
        f"(step {ckpts.latest_step()}) in {ckpts.directory} is intact. Lower config.optim.lr "
        "or the saliency weights, then re-run to resume from it."
      )
    m.pop("finite")
    window.append(m)
    return s

  try:
    for step in range(start, total_steps):
      state, m = train_step(state, step_lib.to_global(next(batches), mesh))
      if pending is not None:
        fetch(pending)
      pending = (step + 1, m)
      done = step + 1
      if done % log_every == 0 or done == total_steps:
        fetch(pending)
        pending = None
        scalars = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        scalars["lr"] = float(schedule(step))
        scalars["steps_per_s"] = len(window) / max(time.time() - t_window, 1e-9)
        window, t_window = [], time.time()
        writer.write_scalars(done, scalars)
        progress.log(done, scalars)
      is_eval = done % eval_every == 0 or done == total_steps
      if is_eval:
        if pending is not None:
          fetch(pending)
          pending = None
        first = {}

        def keep_first(host, outputs):
          if not first:
            first.update(_overlay_images(host, outputs))

        result = run_split(eval_step, state, splits.val, mesh, eval_batch, on_batch=keep_first)
        val = validation_metrics(result)
        val["epoch"] = done / steps_per_epoch
        score = _best_score(config, val)
        if score > best["score"]:
          best = {"score": score, "stale": 0}
        else:
          best["stale"] += 1
        writer.write_scalars(done, val)
        writer.write_images(done, first)
        progress.log(done, val)
      if is_eval or done % ckpt_every == 0 or stop["signal"] is not None:
        if pending is not None:
          fetch(pending)
          pending = None
        early = is_eval and patience > 0 and best["stale"] >= patience
        ckpts.save(
          done,
          state,
          {
            "step": done,
            "data_position": done,
            "epoch": done / steps_per_epoch,
            "best_score": best["score"],
            "evals_since_best": best["stale"],
            "early_stopped": early,
            **val,
          },
          score=score if is_eval else None,
        )
      writer.flush()
      if stop["signal"] is not None:
        logging.warning(
          "Received signal %s: saved the checkpoint at step %d; exiting. Re-run the "
          "same command to resume.",
          stop["signal"],
          done,
        )
        break
      if is_eval and patience > 0 and best["stale"] >= patience:
        logging.info(
          "Early stop at step %d: %s has not improved for %d evaluations.",
          done,
          config.best_metric,
          patience,
        )
        break
    if pending is not None:
      fetch(pending)
  finally:
    batches.close()
    ckpts.close()
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)

  if stop["signal"] is None and config.get("final_eval", True):
    from divisive_jax import evaluate

    for split in ("val", "test"):
      evaluate.evaluate_workdir(workdir, which="best", split=split)
  return val


def _load_splits(config, workdir: str):
  """Process 0 prepares CSV data first (one cache build on a shared filesystem), then the rest."""
  if jax.process_count() == 1 or not config.data.get("csv_path", ""):
    return data_lib.load_splits(config.data, workdir)
  from jax.experimental import multihost_utils

  splits = data_lib.load_splits(config.data, workdir) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("divisive_jax: data prepared")
  return splits or data_lib.load_splits(config.data, workdir)


def _labels(source) -> np.ndarray:
  labels = getattr(source, "label", None)
  if labels is None:
    labels = [source[i]["label"] for i in range(len(source))]
  return np.asarray(labels)


def _main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()
