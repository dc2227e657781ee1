"""N training runs in one program: a population over seeds and loss weights (`members`).

``config.population.seeds = "0,1,2"`` and/or ``config.population.weights = "rrr=1,10,100"``
(``term=values``, several terms separated by ';'; members are the product of seeds and weight
settings). Every member is an ordinary run of its own config (``<workdir>/members/<name>/``:
``config.json``, ``metrics.jsonl``, TensorBoard, orbax checkpoints latest + best on validation,
``eval_val.json``/``eval_test.json``, ``result.json``), usable by `evaluate`, `explain` and
`report` like any workdir, and its numbers are those of that config trained alone (to float
tolerance: ``tests/test_population.py``).

How: one jitted, sharded step (`step.make_population_train_step`) updates all members -- the
step of a single run, vmapped over a leading member axis of the state inside the
``jit(shard_map)`` over ``('data',)``. Seeds and loss weights are runtime values of each member,
so the whole population compiles once, whatever the weights. Data: with host data
(``data.on_device=False``) all members take the same batches, the training order of
``data.shuffle_seed`` (or of the population config's ``seed``), and each member's config says
so; with ``data.on_device=True`` each member draws its own order from its own seed.

A member whose loss or parameters become non-finite is frozen at its last finite state and
reported; early stopping freezes a member likewise; the others continue. The population ends
when all members are frozen or the steps are done.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from divisive_jax import checkpoints as ckpt_lib
from divisive_jax import config_base, evaluation, feed, jsonio, losses, multihost, preflight
from divisive_jax import population_step, preprocess, sharding, writers
from divisive_jax import data as data_lib
from divisive_jax import state as state_lib
from divisive_jax import step as step_lib
from divisive_jax import workdir as workdir_lib
from divisive_jax.data import pipeline
from divisive_jax.members import Member, members_of, union_config
from divisive_jax.evaluators import Context, PadEvaluator

MEMBERS_DIR = "members"


def train_population(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Train (or resume) every member of ``config.population`` in ``workdir``; returns
  {member name: result.json's dict}."""
  writers.quiet_library_logs()
  logging.info(data_lib.describe(config.data))
  config_base.validate(config)
  members = members_of(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.exclusive(workdir):
    return _train(config, workdir, members, allow_config_change)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _member(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def _train(config, workdir, members, allow_config_change) -> dict:
  lead, n = multihost.is_lead(), len(members)
  preflight.check_config(union_config(config, members))
  splits = data_lib.load_splits_once(config.data, workdir)
  preflight.check_splits(config, splits)
  steps_per_epoch, total_steps = state_lib.schedule_lengths(config, len(splits.train))
  class_weights = None
  if config.loss.class_weights == "balanced":
    class_weights = losses.balanced_class_weights(splits.train.label, 2)
  setup = state_lib.build(
    union_config(config, members), steps_per_epoch, total_steps, class_weights
  )
  mesh, names = setup.mesh, setup.loss_cfg.names
  dirs = [os.path.join(workdir, MEMBERS_DIR, m.name) for m in members]
  ckpts = [ckpt_lib.Checkpoints(d) for d in dirs]
  latest = [c.latest_step() for c in ckpts]
  resuming = any(s is not None for s in latest)
  workdir_lib.check_config(
    workdir, config, resuming, allow_config_change, max(filter(None, latest), default=None)
  )
  if lead:
    jsonio.write_text(os.path.join(workdir, "config.json"), config_base.to_json(config) + "\n")
    jsonio.write_json(os.path.join(workdir, "data_info.json"), splits.info)
    for m, d in zip(members, dirs):
      os.makedirs(d, exist_ok=True)
      jsonio.write_text(os.path.join(d, "config.json"), config_base.to_json(m.config) + "\n")
      jsonio.write_json(os.path.join(d, "data_info.json"), splits.info)
  out_writers = [writers.MetricWriter(d, enabled=lead) for d in dirs]
  pretrained = state_lib.read_pretrained(config, mesh)

  def fresh(m):
    s = state_lib.create_state(setup, m.seed, pretrained)
    w = {t: jnp.float32(m.config.loss.weights[t]) for t in names}
    return s.replace(loss_weights=w)

  states, start, frozen = [fresh(m) for m in members], 0, [""] * n
  best = [{"score": -math.inf, "stale": 0} for _ in members]
  if resuming:
    start = min(s or 0 for s in latest)
    for i, c in enumerate(ckpts):
      if latest[i] is None or latest[i] < start:
        continue
      states[i], meta = c.restore(start, states[i])
      best[i] = {"score": meta["best_score"], "stale": meta["evals_since_best"]}
      frozen[i] = meta.get("frozen", "")
    logging.info("Resuming the population of %d members from step %d", n, start)
  for w in out_writers:
    w.truncate_after(start)
  rep = sharding.replicated(mesh)
  state = jax.device_put(_stack(states), rep)
  del states
  inputs = preprocess.from_config(config.data)
  strategy = config.population.strategy
  eval_step = population_step.make_population_eval_step(
    setup.model, mesh, config.loss.cam_kind, config.loss.cam_relu, inputs, strategy
  )
  logging.info(
    "Training %d members x %d steps (%d per epoch, global batch %d) in one program: %s",
    n,
    total_steps,
    steps_per_epoch,
    config.batch_size,
    ", ".join(m.name for m in members),
  )

  eval_every = int(config.eval_every_steps) or max(
    1, int(round(float(config.eval_every_epochs) * steps_per_epoch))
  )
  ckpt_every = int(config.checkpoint_every_steps) or eval_every
  log_every = max(1, int(config.log_every_steps))
  patience, sign = int(config.early_stop_patience), 1.0 if config.best_mode == "max" else -1.0
  eval_batch = evaluation.eval_batch_size(config)
  ctx = Context("val", tuple(splits.class_names), tuple(splits.attack_types), config.task)
  k_max = int(config.steps_per_dispatch)
  if config.data.on_device:
    resident = feed.ResidentData(splits.train, mesh, int(config.batch_size), 0)
    seeds = [config_base.shuffle_seed(m.config) for m in members]
    multi = step_lib.make_population_train_steps(
      setup.model, setup.loss_cfg, setup.tx, mesh, inputs
    )
    batches = None
  else:
    resident = None
    one = population_step.make_population_train_step(
      setup.model, setup.loss_cfg, setup.tx, mesh, inputs, strategy
    )
    batches = feed.DevicePrefetch(
      pipeline.train_batches(
        splits.train,
        int(config.batch_size),
        seed=config_base.shuffle_seed(config),
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      ),
      mesh,
      size=int(config.data.prefetch),
    )
  progress = writers.Progress(start, total_steps)
  windows, t_window, val = [[] for _ in members], time.time(), [{} for _ in members]

  def active():
    return jax.device_put(np.array([not f for f in frozen]), rep)

  def _event(done):
    return (
      done % log_every == 0
      or done % eval_every == 0
      or done % ckpt_every == 0
      or done == total_steps
    )

  def _dispatch(step):
    nonlocal state
    if resident is None:
      state, m = one(state, next(batches), active())
      return 1, jax.tree.map(lambda x: x[None], m)
    k = min(k_max, total_steps - step)
    if any(_event(d) for d in range(step + 1, step + k)):
      k = 1
    idx = resident.indices(step, k, seeds)
    state, m = multi(state, resident.arrays, idx, active())
    return k, m

  def _fetch(done, k, m):
    m = {key: np.asarray(v, np.float64).reshape(k, n) for key, v in jax.device_get(m).items()}
    for j in range(k):
      for i in range(n):
        if frozen[i]:
          continue
        row = {key: float(v[j, i]) for key, v in m.items()}
        if not (math.isfinite(row["loss"]) and row.pop("finite") == 1.0):
          frozen[i] = f"non-finite loss or parameters at step {done - k + 1 + j}"
          logging.warning(
            "Member %s: %s; frozen at its last finite state, the others go on.",
            members[i].name,
            frozen[i],
          )
          continue
        windows[i].append(row)

  def _log(done):
    nonlocal t_window
    seconds, shown = max(time.time() - t_window, 1e-9), []
    for i, w in enumerate(windows):
      if w:
        scalars = {key: float(np.mean([r[key] for r in w])) for key in w[0]}
        scalars["lr"] = float(setup.schedule(done - 1))
        scalars["steps_per_s"] = len(w) / seconds
        out_writers[i].write_scalars(done, scalars)
        shown.append(scalars["loss"])
      windows[i] = []
    t_window = time.time()
    live = sum(not f for f in frozen)
    progress.log(done, {"loss": float(np.mean(shown)) if shown else float("nan")})
    if live < n:
      logging.info("%d of %d members active", live, n)

  def _evaluate(done):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    pads = [[PadEvaluator(ctx)] for _ in members]
    evaluation.run_split(eval_step, variables, splits.val, mesh, eval_batch, pads, members=True)
    scores = []
    for i, (pad,) in enumerate(pads):
      result = {**pad.validation_metrics(), "epoch": done / steps_per_epoch}
      score = sign * result[config.best_metric]
      if frozen[i]:
        scores.append(None)
        continue
      val[i] = result
      if score > best[i]["score"]:
        best[i] = {"score": score, "stale": 0}
      else:
        best[i]["stale"] += 1
        if patience > 0 and best[i]["stale"] >= patience:
          frozen[i] = f"early stop at step {done}"
      out_writers[i].write_scalars(done, result)
      scores.append(score)
    aurocs = [v.get("val/auroc", float("nan")) for v in val]
    progress.log(done, {"val/auroc": float(np.nanmean(aurocs))})
    return scores

  def _checkpoint(done, scores):
    for i, c in enumerate(ckpts):
      meta = {
        "step": done,
        "data_position": done,
        "epoch": done / steps_per_epoch,
        "best_score": best[i]["score"],
        "evals_since_best": best[i]["stale"],
        "early_stopped": frozen[i].startswith("early"),
        "frozen": frozen[i],
        **val[i],
      }
      c.save(done, _member(state, i), meta, score=None if scores is None else scores[i])

  step, failed = start, True
  try:
    while step < total_steps and not all(frozen):
      k, m = _dispatch(step)
      done = step + k
      _fetch(done, k, m)
      if done % log_every == 0 or done == total_steps:
        _log(done)
      scores = _evaluate(done) if done % eval_every == 0 or done == total_steps else None
      if scores is not None or done % ckpt_every == 0:
        _checkpoint(done, scores)
      for w in out_writers:
        w.flush()
      step = done
    for c in ckpts:
      c.wait()
    failed = False
  finally:
    for closer in [batches, resident] + out_writers:
      if closer is not None:
        closer.close()
    if failed:
      for c in ckpts:
        c.close_quietly()

  results = {}
  try:
    single_eval = step_lib.make_eval_step(
      setup.model, mesh, config.loss.cam_kind, config.loss.cam_relu, inputs
    )
    for i, m in enumerate(members):
      if not config.final_eval:
        break
      b = ckpts[i].resolve("best")
      _, target = state_lib.abstract_variables(m.config, mesh)
      variables = ckpts[i].restore_variables(b, target)
      ev = evaluation.evaluate_checkpoint(
        dirs[i], m.config, splits, setup.model, variables, b, "best", mesh, eval_step=single_eval
      )
      results[m.name] = _result(m, ev, frozen[i])
      if lead:
        jsonio.write_json(os.path.join(dirs[i], "result.json"), results[m.name])
  finally:
    for c in ckpts:
      c.close()
  return results


def _result(member: Member, ev: dict, frozen: str) -> dict:
  """A member's summary: its settings, the validation figures of its best checkpoint and test."""
  val, test = ev["val"], ev["test"]
  align = test.get("saliency_alignment", {}).get("true_class", {})
  return {
    "member": member.name,
    "seed": member.seed,
    "weights": dict(member.weights),
    "best_step": val["checkpoint_step"],
    "frozen": frozen,
    "val_auroc": val["auroc"],
    "val_accuracy": val["accuracy_at_0.5"],
    "val_loss": val["mean_cross_entropy"],
    "test_auroc": test["auroc"],
    "test_accuracy": test["accuracy_at_0.5"],
    "test_alignment_pe": align.get("proportional_energy", {}).get("mean"),
  }
