"""N training runs in one program: a population over seeds and loss weights (`members`).

``config.population.seeds = "0,1,2"`` and/or ``config.population.weights = "rrr=1,10,100"``
(``term=values``, several terms separated by ';'; members are the product of seeds and weight
settings). Every member is an ordinary run of its own config (``<workdir>/members/<name>/``:
``config.json``, ``metrics.jsonl``, TensorBoard, orbax checkpoints latest + best on validation,
``eval_val.json``/``eval_test.json``, ``result.json``), usable by `evaluate`, `explain` and
`report` like any workdir, and its numbers are those of that config trained alone (to float
tolerance: ``tests/test_population.py``).

How: one jitted, sharded step (`population_step.make_population_train_step`) updates all
members -- the step of a single run over a leading member axis of the state inside the
``jit(shard_map)`` over ``('data',)``: vmapped on GPUs and TPUs, the members unrolled in the
program on CPU (``config.population.strategy``). Seeds and loss weights are runtime values of each member,
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
from divisive_jax import config_base, evaluation, feed, jsonio, loop, losses, multihost, preflight
from divisive_jax import population_step, preprocess, sharding, writers
from divisive_jax import data as data_lib
from divisive_jax import state as state_lib
from divisive_jax import step as step_lib
from divisive_jax import workdir as workdir_lib
from divisive_jax.members import Member, members_of, union_config
from divisive_jax.errors import WorkdirError
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


def _resume_step(ckpts) -> int | None:
  """The newest step every member has a checkpoint of (None: a fresh population)."""
  if all(c.latest_step() is None for c in ckpts):
    return None
  common = set.intersection(*(set(c.manager.all_steps()) for c in ckpts))
  if not common:
    raise WorkdirError(
      f"the members' checkpoints in {os.path.dirname(ckpts[0].directory)}/.. have no step in "
      "common (members added or removed?); train the population in a new workdir"
    )
  return max(common)


def _train(config, workdir, members, allow_config_change) -> dict:
  lead, n = multihost.is_lead(), len(members)
  dirs = [os.path.join(workdir, MEMBERS_DIR, m.name) for m in members]
  ckpts = [ckpt_lib.Checkpoints(d) for d in dirs]
  start = _resume_step(ckpts)
  workdir_lib.check_config(workdir, config, start is not None, allow_config_change, start)
  mesh = sharding.make_mesh()
  pretrained = None if start is not None else state_lib.read_pretrained(config, mesh)
  union = union_config(config, members)
  preflight.check_config(union)
  splits = data_lib.load_splits_once(config.data, workdir)
  preflight.check_splits(config, splits)
  steps_per_epoch, total_steps = state_lib.schedule_lengths(config, len(splits.train))
  class_weights = None
  if config.loss.class_weights == "balanced":
    class_weights = losses.balanced_class_weights(splits.train.label, 2)
  setup = state_lib.build(union, steps_per_epoch, total_steps, class_weights)
  if lead:
    jsonio.write_text(os.path.join(workdir, "config.json"), config_base.to_json(config) + "\n")
    jsonio.write_json(os.path.join(workdir, "data_info.json"), splits.info)
    for m, d in zip(members, dirs):
      os.makedirs(d, exist_ok=True)
      jsonio.write_text(os.path.join(d, "config.json"), config_base.to_json(m.config) + "\n")
      jsonio.write_json(os.path.join(d, "data_info.json"), splits.info)
  out_writers = [writers.MetricWriter(d, enabled=lead) for d in dirs]

  weights = [{t: float(m.config.loss.weights[t]) for t in setup.loss_cfg.names} for m in members]
  state = state_lib.create_states(setup, [m.seed for m in members], weights, pretrained)
  frozen, best = [""] * n, [loop.Best() for _ in members]
  if start is not None:
    restored = []
    for i, c in enumerate(ckpts):
      member_state, meta = c.restore(start, _member(state, i))
      restored.append(member_state)
      best[i] = loop.Best(meta["best_score"], meta["evals_since_best"])
      frozen[i] = meta.get("frozen", "")
    state = jax.device_put(_stack(restored), sharding.replicated(mesh))
    logging.info("Resuming the population of %d members from step %d", n, start)
  start = start or 0
  for w in out_writers:
    w.truncate_after(start)
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
  cadence = loop.Cadence.from_config(config, steps_per_epoch, total_steps)
  patience, sign = int(config.early_stop_patience), 1.0 if config.best_mode == "max" else -1.0
  eval_batch = evaluation.eval_batch_size(config)
  ctx = Context("val", tuple(splits.class_names), tuple(splits.attack_types), config.task)
  k_max = int(config.steps_per_dispatch)
  if config.data.on_device:
    resident = feed.ResidentData(
      splits.train, mesh, int(config.batch_size), config_base.shuffle_seed(config)
    )
    seeds = [config_base.shuffle_seed(m.config) for m in members]
    multi = population_step.make_population_train_steps(
      setup.model, setup.loss_cfg, setup.tx, mesh, inputs, strategy
    )
    batches = None
  else:
    resident = None
    one = population_step.make_population_train_step(
      setup.model, setup.loss_cfg, setup.tx, mesh, inputs, strategy
    )
    batches = feed.host_batches(config, splits.train, mesh, start)
  progress = writers.Progress(start, total_steps)
  windows, t_window, val = [[] for _ in members], time.time(), [{} for _ in members]
  rep = sharding.replicated(mesh)

  def active():
    return jax.device_put(np.array([not f for f in frozen]), rep)

  def _dispatch(step):
    nonlocal state
    if resident is None:
      state, m = one(state, next(batches), active())
      return 1, jax.tree.map(lambda x: x[None], m)
    k = cadence.dispatch(step, k_max)
    state, m = multi(state, resident.arrays, resident.indices(step, k, seeds), active())
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
      if frozen[i]:
        scores.append(None)
        continue
      val[i] = {**pad.validation_metrics(), "epoch": done / steps_per_epoch}
      score = sign * val[i][config.best_metric]
      best[i].update(score)
      if best[i].patience_over(patience):
        frozen[i] = f"early stop at step {done}"
      out_writers[i].write_scalars(done, val[i])
      scores.append(score)
    aurocs = [v.get("val/auroc", float("nan")) for v in val]
    progress.log(done, {"val/auroc": float(np.nanmean(aurocs))})
    return scores

  def _checkpoint(done, scores):
    for i, c in enumerate(ckpts):
      meta = loop.checkpoint_meta(
        done,
        steps_per_epoch,
        best[i],
        val[i],
        early_stopped=frozen[i].startswith("early"),
        frozen=frozen[i],
      )
      c.save(done, _member(state, i), meta, score=None if scores is None else scores[i])

  step, failed, stop = start, True, loop.StopSignal()
  try:
    with stop:
      while step < total_steps and not all(frozen):
        k, m = _dispatch(step)
        done = step + k
        _fetch(done, k, m)
        if cadence.logs(done):
          _log(done)
        scores = _evaluate(done) if cadence.evaluates(done) else None
        stopping = (cadence.logs(done) or cadence.checkpoints(done)) and stop.requested()
        if cadence.checkpoints(done) or stopping:
          _checkpoint(done, scores)
        for w in out_writers:
          w.flush()
        step = done
        if stopping:
          logging.warning(
            "Received signal %s: saved the checkpoints at step %d; exiting. Re-run "
            "the same command to resume.",
            stop.signal,
            done,
          )
          break
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
    if stop.signal is None:
      results = _final_evaluation(config, members, dirs, ckpts, splits, setup, inputs, frozen)
  finally:
    for c in ckpts:
      c.close()
  return results


def _final_evaluation(config, members, dirs, ckpts, splits, setup, inputs, frozen) -> dict:
  """Each member's best checkpoint on val and test (one compiled eval step for all)."""
  results = {}
  if not config.final_eval:
    return results
  single_eval = step_lib.make_eval_step(
    setup.model, setup.mesh, config.loss.cam_kind, config.loss.cam_relu, inputs
  )
  for i, m in enumerate(members):
    b = ckpts[i].resolve("best")
    _, target = state_lib.abstract_variables(m.config, setup.mesh)
    variables = ckpts[i].restore_variables(b, target)
    ev = evaluation.evaluate_checkpoint(
      dirs[i],
      m.config,
      splits,
      setup.model,
      variables,
      b,
      "best",
      setup.mesh,
      eval_step=single_eval,
    )
    results[m.name] = _result(m, ev, frozen[i])
    if multihost.is_lead():
      jsonio.write_json(os.path.join(dirs[i], "result.json"), results[m.name])
  multihost.sync("population results written")
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
