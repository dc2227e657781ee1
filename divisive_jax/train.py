"""The training job: one run, or a population of N runs in one program; both the same loop.

`train_and_evaluate(config, workdir)` is the whole job. `_setup` checks before any training
(config, workdir lock and stored config, devices, pretrained weights, data, `preflight`) and
builds a `Job`: one `loop.Record` per member -- the run itself, or each member of the population
(`members`) -- with its workdir, checkpoints, writer, best evaluation and `layout.Status`, and
the compiled steps, data and state (one member: no member axis; several: one program, seeds and
loss weights runtime values). `Job.run` is the loop: `_drain` (a dispatch's metrics, fetched
after the next is dispatched), `_log`, `_evaluate` (``config.val_evals`` on the validation
split), `_checkpoint`; then `_final_evaluation` of each member's best checkpoint
(`loop.selection`). Resuming restores every member's newest common checkpoint (state, best
evaluation, status; `resume`: damaged checkpoints set aside, members without one trained up to
it first); the data stream is a pure function of (seed, step), so a resumed run sees the batches
an uninterrupted run would.

Non-finite steps. On the device a step whose loss or parameters are not finite keeps the state
it started from (`step`): the member is frozen at its last finite state. What follows is the
job's kind, not its member count: a population reports the member diverged (checkpoints,
``result.json``, evaluation files) and goes on with the others; a run stops with
`NonFiniteLossError`, its last good checkpoint intact. Early stopping freezes a member likewise.
SIGTERM or Ctrl-C (agreed across processes) saves every member's checkpoint and raises
`Interrupted` (a sweep stops there too; the command exits with 143 / 130).
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging

from divisive_jax import checkpoints as ckpt_lib
from divisive_jax import config_base, jsonio, layout, losses, loop, multihost, preflight
from divisive_jax import members as members_lib
from divisive_jax import preprocess, resume, sharding, writers
from divisive_jax import state as state_lib
from divisive_jax import step as step_lib
from divisive_jax import workdir as workdir_lib
from divisive_jax import data as data_lib
from divisive_jax.errors import NonFiniteLossError
from divisive_jax.evaluators import Context
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
    return _setup(config, workdir, members, allow_config_change).run()


def _setup(config, workdir: str, members, allow_config_change: bool) -> "Job":
  kind = "population" if layout.is_population(config) else "run"
  logging.info(
    f"JAX process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local "
    f"/ {jax.device_count()} global devices ({jax.devices()[0].platform}); workdir {workdir}"
  )
  workdir_lib.check_kind(workdir, kind)
  preflight.check_devices(config)
  # Before any data work: is this workdir's checkpoint this experiment's? Are the weights good?
  dirs = members_lib.workdirs(config, workdir, members)
  latest = resume.plan(workdir, members, dirs).step  # from the file system: nothing written yet
  workdir_lib.check_config(workdir, config, latest is not None, allow_config_change, latest)
  mesh = sharding.make_mesh(bn_group=config.model.bn_group)
  pretrained = state_lib.read_pretrained(config, mesh) if latest is None else None
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
  lead, keep = multihost.is_lead(), 1 if kind == "run" else 2  # a population: latest two
  if lead:
    writers.write_configs(config, workdir, members, dirs, splits.info)
  records = [_record(m, d, keep) for m, d in zip(members, dirs)]

  def fresh(group, start: bool):
    """Members ``group`` initialised (``start``: they start training now, from scratch)."""
    ms = [members[i] for i in group]
    weights = [{t: float(m.config.loss.weights[t]) for t in setup.loss_cfg.names} for m in ms]
    first = (pretrained or state_lib.read_pretrained(config, mesh)) if start else None
    state = state_lib.create_states(setup, [m.seed for m in ms], weights, first)
    if start:
      writers.write_parameters(config, state, [records[i].workdir for i in group], lead)
    return state

  def catch_up(group, start, states, metas, until):
    names = ", ".join(members[i].name for i in group)
    origin = f"its checkpoint at step {start}" if start else "scratch"
    logging.warning(f"Member(s) {names}: no checkpoint at step {until}; trained from {origin}")
    sub = [_record(members[i], dirs[i], keep, meta) for i, meta in zip(group, metas)]
    for r in sub:
      r.out.truncate_after(start)
    rep = sharding.replicated(mesh)
    state = step_lib.join_members(states, rep) if start else fresh(group, True)
    state = state_lib.freeze(state, [not r.status.live for r in sub], mesh)
    Job(config, workdir, kind, sub, setup, splits, state, start, until=until).run()

  everyone = range(len(members))
  state = fresh(everyone, latest is None)
  resumed, state = resume.restore(workdir, records, state, mesh, catch_up)
  if resumed is None and latest is not None:  # every checkpoint was damaged: from scratch
    state = fresh(everyone, True)
  latest = resumed
  for r in records:
    r.out.truncate_after(latest or 0)
  return Job(config, workdir, kind, records, setup, splits, state, latest or 0)


def _record(member, workdir: str, keep: int, meta: dict | None = None) -> loop.Record:
  """A member as the loop keeps it (its best evaluation and status from a checkpoint's meta)."""
  ckpts = ckpt_lib.Checkpoints(workdir, keep_latest=keep, writer=True)
  out = writers.MetricWriter(workdir, enabled=multihost.is_lead())
  meta = meta or {}
  return loop.Record(member, workdir, ckpts, out, loop.Best.of(meta), layout.Status.of(meta))


class Job:
  """A training job's members (`loop.Record`), compiled steps, data and state, and its loop."""

  def __init__(self, config, workdir, kind, records, setup, splits, state, start, until=None):
    """``until``: train to that step only, checkpoint there and evaluate nothing after (members
    catching up with the others, `resume`)."""
    self.config, self.workdir, self.kind, self.records = config, workdir, kind, records
    self.setup, self.splits, self.state, self.start = setup, splits, state, start
    self.spe, self.total = state_lib.schedule_lengths(config, len(splits.train))
    self.until = self.total if until is None else until
    self.final = until is None and config.final_eval
    self.cadence = loop.Cadence.from_config(config, self.spe, self.total, self.until)
    self.sign, self.rule = loop.selection(config)
    self.ctx = Context("val", tuple(splits.class_names), tuple(splits.attack_types), config.task)
    self.progress, self.t_window, self.pending = writers.Progress(start, self.total), 0.0, None
    self._eval_steps = {}

  def eval_step(self, members: int):
    """The compiled eval step of ``members`` members (built once each)."""
    if members not in self._eval_steps:
      c = self.config
      inputs, strategy = preprocess.from_config(c.data), c.population.strategy
      model, kind, relu = self.setup.model, c.loss.cam_kind, c.loss.cam_relu
      step = step_lib.make_eval_step(model, self.setup.mesh, kind, relu, inputs, members, strategy)
      self._eval_steps[members] = step
    return self._eval_steps[members]

  def live(self) -> list:
    return [r for r in self.records if r.status.live]

  def run(self) -> dict:
    """Train what is left, then evaluate each member's best checkpoint; {name: result}."""
    self._announce()
    members = [r.member for r in self.records]
    guard = self.kind == "population"  # a run stops on a non-finite step: no guard needed
    dispatch = loop.Dispatcher.for_training(
      self.setup, members, self.splits.train, self.start, self.cadence, guard
    )
    cadence, stop, failed = self.cadence, loop.StopSignal(), True
    step = saved = self.start
    self.t_window = time.time()
    try:
      with stop:
        while step < self.until and self.live():
          with writers.Heartbeat("Compiling the train step", active=step == self.start):
            self.state, k, metrics = dispatch(self.state, step)
          self._drain()  # the previous dispatch's metrics: fetched after this one is dispatched
          step += k
          self.pending = (step, k, metrics)
          checkpoints, evaluates, logs = (
            cadence.checkpoints(step),
            cadence.evaluates(step),
            cadence.logs(step),
          )
          if checkpoints or evaluates or logs:
            self._drain()
          if logs:
            self._log(step)
          elif self.progress.due():
            last = np.asarray(metrics["loss"]).reshape(k, len(self.records))[-1]
            self.progress.log(step, {"loss": float(np.nanmean(last))})
          scores = self._evaluate(step) if evaluates else [None] * len(self.records)
          stopping = (logs or checkpoints) and stop.requested()
          if checkpoints or stopping or step == self.until:
            self._checkpoint(step, scores)
            saved = step
          for r in self.records:
            r.out.flush()
          if stopping:
            logging.warning(f"Received signal {stop.signal}: saved the checkpoints at step {step}")
            break
        self._drain()
        if not self.live() and saved < step:  # every member frozen between checkpoints
          self._checkpoint(step, [None] * len(self.records))
        if saved < self.until < self.total and step < self.until:  # frozen before it
          self._checkpoint(self.until, [None] * len(self.records))
        for r in self.records:
          r.ckpts.wait()
        failed = False
    finally:
      dispatch.close()
      for r in self.records:
        r.out.close()
        if failed:
          r.ckpts.close_quietly()
    try:
      stop.check(self.workdir, step)
      if self.final:
        return self._final_evaluation(step)
      return {}
    finally:
      for r in self.records:
        r.ckpts.close()

  def _announce(self) -> None:
    n, where = len(self.records), self.workdir
    if self.start >= self.total or not self.live():
      whose = "its" if self.kind == "run" else "each member's"
      logging.info(
        f"The {self.kind} in {where} is complete (step {self.start} of {self.total}): nothing to "
        f"train; re-evaluating {whose} best checkpoint."
      )
      return
    if self.start:
      logging.info(f"Resuming from the checkpoint at step {self.start} in {where}")
    names = ", ".join(r.member.name for r in self.records)
    together = f"; {n} member(s) in one program: {names}" if self.kind == "population" else ""
    logging.info(
      f"Training {self.total} steps ({self.spe} per epoch, global batch "
      f"{self.config.batch_size}) on {jax.device_count()} device(s), {jax.process_count()} "
      f"process(es){together}"
    )
    if self.config.data.on_device:
      logging.info(
        f"Training split on the device(s); {self.config.steps_per_dispatch} step(s) per dispatch"
      )

  def _drain(self) -> None:
    """Fetch the pending dispatch's metrics (as floats, step by step and member by member); a
    member with a non-finite step is diverged (frozen on the device already); a run stops."""
    if self.pending is None:
      return
    (done, k, metrics), self.pending = self.pending, None
    n = len(self.records)
    m = {key: np.asarray(v, np.float64).reshape(k, n) for key, v in jax.device_get(metrics).items()}
    m.pop("live", None)
    for j in range(k):
      for i, r in enumerate(self.records):
        if not r.status.live:
          continue
        row = {key: float(v[j, i]) for key, v in m.items()}
        if math.isfinite(row["loss"]) and row.pop("finite") == 1.0:
          r.window.append(row)
          continue
        r.status = layout.Status("diverged", done - k + 1 + j)
        if self.kind == "run":
          _stop_non_finite(r, row)
        logging.warning(f"Member {r.member.name} {r.status.describe()}; the population goes on")

  def _log(self, done: int) -> None:
    seconds, shown = max(time.time() - self.t_window, 1e-9), []
    for r in self.records:
      if r.window:
        scalars = {key: float(np.mean([row[key] for row in r.window])) for key in r.window[0]}
        scalars["lr"] = float(self.setup.schedule(done - 1))
        scalars["steps_per_s"] = len(r.window) / seconds
        r.out.write_scalars(done, scalars)
        shown.append(scalars)
      r.window = []
    self.t_window = time.time()
    self.progress.log(done, _mean(shown))
    if len(self.live()) < len(self.records):
      logging.info("%d of %d members active", len(self.live()), len(self.records))

  def _evaluate(self, done: int) -> list:
    """``config.val_evals`` on the validation split for every member (one pass); each live
    member's (score, val loss) by the selection rule, None for the frozen ones."""
    c, n = self.config, len(self.records)
    groups = [evaluation.make(c.val_evals, self.ctx) for _ in self.records]
    variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
    batch = evaluation.eval_batch_size(c)
    with writers.Heartbeat(f"Evaluating on the validation split (step {done})"):
      evaluation.run_split(
        self.eval_step(n), variables, self.splits.val, self.setup.mesh, batch, groups
      )
    scores, shown, stopped = [None] * n, [], False
    for i, (r, evs) in enumerate(zip(self.records, groups)):
      if not r.status.live:
        continue
      scalars, images = evaluation.validation_logs(evs)
      r.val = {**scalars, "epoch": done / self.spe}
      scores[i] = (self.sign * r.val[c.best_metric], r.val["val/loss"])
      r.best.update(done, *scores[i])
      r.out.write_scalars(done, r.val)
      r.out.write_images(done, images)
      shown.append(r.val)
      if r.best.patience_over(int(c.early_stop_patience)):
        r.status, stopped = layout.Status("early_stopped", done), True
        logging.info(
          f"Early stop of {r.member.name} at step {done}: {c.best_metric} has not improved for "
          f"{c.early_stop_patience} evaluations."
        )
    if stopped:
      frozen = [not r.status.live for r in self.records]
      self.state = state_lib.freeze(self.state, frozen, self.setup.mesh)
    self.progress.log(done, _mean(shown))
    return scores

  def _checkpoint(self, done: int, scores: list) -> None:
    """Every member's checkpoint at ``done`` (each member's previous one complete first, so a
    kill leaves a step every member has)."""
    for r in self.records:
      r.ckpts.wait()
    n = len(self.records)
    trained = np.asarray(jax.device_get(self.state.step)).reshape(n)
    states = step_lib.split_members(self.state, n)
    for r, s, t, score in zip(self.records, states, trained, scores):
      meta = loop.checkpoint_meta(done, self.spe, r.val, r.best, r.status, int(t))
      r.ckpts.save(done, s, meta, score=score)

  def _final_evaluation(self, done: int) -> dict:
    """Each member's best checkpoint on val and test, with the splits and one compiled eval
    step in memory (and the member's state, when its best checkpoint is the last): its eval
    files, ``result.json`` and closing lines."""
    results, mesh = {}, self.setup.mesh
    states = step_lib.split_members(self.state, len(self.records))
    for r, s in zip(self.records, states):
      best = r.ckpts.resolve("best")
      variables = {"params": s.params, "batch_stats": s.batch_stats}
      if best != done:
        _, target = state_lib.abstract_variables(r.member.config, mesh)
        variables = r.ckpts.restore_variables(best, target)
      meta = dict(r.ckpts.meta(best), status=r.status.to_json())
      inf = ckpt_lib.Inference(r.member.config, self.setup.model, variables, best, mesh, meta)
      ev = evaluation.evaluate_checkpoint(
        r.workdir, self.splits, inf, "best", eval_step=self.eval_step(1)
      )
      selection = self._selection(r, best)
      results[r.member.name] = members_lib.result(r.member, ev, selection)
      if multihost.is_lead():
        jsonio.write_json(layout.path(r.workdir, layout.RESULT), results[r.member.name])
        logging.info(evaluation.summary_text(r.workdir, ev, selection["rule"]))
    if self.kind == "population" and multihost.is_lead():
      logging.info(members_lib.table(results))
    multihost.sync("results written")
    return results

  def _selection(self, r, best: int) -> dict:
    """How ``best`` was chosen (``result.json``); a warning when other evaluations tie with it."""
    scored = r.best.step == best
    tied = sorted(r.best.tied) if scored else []
    if tied:
      logging.warning(
        f"{r.member.name}: {len(tied)} other evaluation(s) (step(s) {tied}) tie with step {best} "
        f"at {self.config.best_metric} = {self.sign * r.best.score:g}; chosen by {self.rule}"
      )
    rule = self.rule if scored else "the latest checkpoint (no evaluation scored before it froze)"
    return {"metric": self.config.best_metric, "rule": rule, "step": best, "tied_steps": tied}


def _stop_non_finite(r, row) -> None:
  """A run's non-finite step: its records after its last checkpoint go, and it stops."""
  r.ckpts.wait()
  last = r.ckpts.latest_step()
  r.out.truncate_after(last or 0)
  parts = {key: v for key, v in row.items() if key.startswith("loss/")}
  where = (
    f"The last good checkpoint (step {last}) in {r.ckpts.directory} is intact; re-run to resume "
    "from it"
    if last is not None
    else "No checkpoint was saved before it, so re-running starts from scratch"
  )
  raise NonFiniteLossError(
    f"non-finite loss or parameters (loss {row['loss']}) at step {r.status.step}; parts: "
    f"{parts}. {where} after lowering config.optim.lr or the saliency weights."
  )


def _mean(rows: list[dict]) -> dict:
  """The members' figures averaged for the console (one member: its own)."""
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
