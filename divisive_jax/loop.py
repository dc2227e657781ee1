"""The pieces of the training loop (`train`) that are not its body.

* `Dispatcher`: the compiled train step of the job's members and its feed; one call runs the
  next dispatch (one step on a host batch, or k steps on the device-resident split). The
  benchmarks time this very object (`benchmarks/common.py`), so they measure what users run.
* `Cadence`: the steps at which a run logs, evaluates and checkpoints, and how many steps the
  next dispatch may run so that these events land on exact steps.
* `Best`: the best evaluation so far by the selection rule (the metric; of equal values the
  lower validation loss, then the earlier step, as in `checkpoints`) and the evaluations since
  the metric improved (early stopping).
* `checkpoint_meta`: the JSON record saved with each checkpoint; `Record`: one member of a job
  as the loop keeps it.
* `StopSignal`: SIGTERM and SIGINT (Ctrl-C), agreed across processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
from typing import Any

from divisive_jax import config_base, feed, multihost, preprocess
from divisive_jax.errors import Interrupted
from divisive_jax import step as step_lib


def train_step(setup, members=1, strategy="auto", resident=False, guard=None):
  """The jitted train step of a job of ``members`` runs (`step.make_train_step` with the
  config's input settings): what `Dispatcher` runs, and what `benchmarks/aot.py` compiles."""
  inputs = preprocess.from_config(setup.config.data)
  return step_lib.make_train_step(
    setup.model, setup.loss_cfg, setup.tx, setup.mesh, inputs, members, strategy, resident, guard
  )


class Dispatcher:
  """Runs the train step of ``members`` runs on a feed: ``(state, step) -> (state, k, metrics)``.

  ``source``: a `feed.ResidentData` (k steps per dispatch on the device, ``k`` from ``cadence``
  up to ``k_max``; each member its own order from ``seeds``) or an iterator of global batches
  (`feed.DevicePrefetch`; one step per dispatch, every member the same batch). Each member's
  liveness is part of the state (`step` module docstring). Metrics are device arrays, (k, P) or
  (P,) with several members; fetch them whenever convenient.
  """

  def __init__(
    self, setup, source, members=1, strategy="auto", k_max=1, cadence=None, seeds=None, guard=None
  ):
    self.source, self.members, self.k_max, self.cadence = source, int(members), int(k_max), cadence
    self.resident = isinstance(source, feed.ResidentData)
    self.seeds = list(seeds) if seeds is not None else None
    self.fn = train_step(setup, members, strategy, self.resident, guard)

  @classmethod
  def for_training(cls, setup, members, split, start: int, cadence, guard) -> "Dispatcher":
    """The trainer's: the config's feed (host batches from ``start``, or the resident split);
    ``guard``: the liveness guard (a population's steps, whatever its size)."""
    config = members[0].config  # the members share the data settings (and, on the host, the order)
    if config.data.on_device:
      batch = int(config.batch_size)
      source = feed.ResidentData(split, setup.mesh, batch, config_base.shuffle_seed(config))
    else:
      source = feed.host_batches(config, split, setup.mesh, start)
    seeds = [config_base.shuffle_seed(m.config) for m in members]
    k_max = int(config.steps_per_dispatch)
    strategy = config.population.strategy
    return cls(setup, source, len(members), strategy, k_max, cadence, seeds, guard)

  def _inputs(self, step: int):
    """(k, the step's arguments but the state) of the dispatch from ``step``."""
    if self.resident:
      k = self.cadence.dispatch(step, self.k_max) if self.cadence else self.k_max
      seeds = self.seeds or [self.source.seed] * self.members
      return k, (self.source.arrays, self.source.indices(step, k, seeds))
    return 1, (next(self.source),)

  def __call__(self, state, step: int):
    k, args = self._inputs(step)
    state, metrics = self.fn(state, *args)
    return state, k, metrics

  def compile(self, state, step: int = 0):
    """Compile ahead of time for the dispatch from ``step`` (a host feed gives it one batch);
    returns the executable, which later calls run. For benchmarks: XLA's view of the program."""
    self.fn = self.fn.lower(state, *self._inputs(step)[1]).compile()
    return self.fn

  def close(self) -> None:
    self.source.close()


@dataclasses.dataclass(frozen=True)
class Cadence:
  eval_every: int
  ckpt_every: int
  log_every: int
  total: int
  until: int | None = None  # a job that stops before ``total`` (`train.Job`): no dispatch past it

  @classmethod
  def from_config(cls, config, steps_per_epoch: int, total_steps: int, until=None) -> "Cadence":
    eval_every = int(config.eval_every_steps) or max(
      1, int(round(float(config.eval_every_epochs) * steps_per_epoch))
    )
    return cls(
      eval_every=eval_every,
      ckpt_every=int(config.checkpoint_every_steps) or eval_every,
      log_every=max(1, int(config.log_every_steps)),
      total=total_steps,
      until=until,
    )

  def logs(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.total

  def evaluates(self, done: int) -> bool:
    return done % self.eval_every == 0 or done == self.total

  def checkpoints(self, done: int) -> bool:
    return self.evaluates(done) or done % self.ckpt_every == 0

  def dispatch(self, step: int, k_max: int) -> int:
    """Steps to run from ``step``: ``k_max`` unless an event falls inside, then 1."""
    k = min(k_max, (self.total if self.until is None else self.until) - step)
    if any(self.logs(d) or self.checkpoints(d) for d in range(step + 1, step + k)):
      return 1
    return k


def selection(config) -> tuple[float, str]:
  """(sign, rule): the selection metric times ``sign`` is higher for better evaluations;
  ``rule`` says in words how the best checkpoint is chosen (closing line, ``result.json``)."""
  metric = config.best_metric
  mode = config_base.BEST_METRICS[metric] if config.best_mode == "auto" else config.best_mode
  sign = 1.0 if mode == "max" else -1.0
  if metric == "epoch":
    return sign, f"the {'latest' if mode == 'max' else 'first'} evaluation (best_metric=epoch)"
  ties = "the earlier step" if metric == "val/loss" else "the lower val/loss, then the earlier step"
  word = "highest" if mode == "max" else "lowest"
  return sign, f"the {word} {metric} (ties: {ties})"


class Best:
  """The best evaluation so far by the selection rule, and the evaluations since it improved.

  Rule: the highest score (the selection metric, signed so that higher is better); of equal
  scores the lower validation loss; then the earlier step -- the same order as the checkpoints'
  (`checkpoints.selection_key`). ``stale`` counts the evaluations since the SCORE last improved
  (early stopping: a later evaluation must be strictly better to count as progress); ``tied``
  lists the other steps whose score equals the best one's (the choice among them was made by
  the loss or the step: worth a warning)."""

  def __init__(self, score=None, loss=None, step=None, stale: int = 0, tied=()):
    self.score = -math.inf if score is None else float(score)
    self.loss = math.inf if loss is None or not math.isfinite(loss) else float(loss)
    self.step, self.stale, self.tied = step, int(stale), list(tied)

  def update(self, step: int, score: float, loss: float) -> None:
    loss = loss if math.isfinite(loss) else math.inf
    if score > self.score:
      self.score, self.loss, self.step, self.stale, self.tied = score, loss, step, 0, []
      return
    self.stale += 1
    if score == self.score:
      if loss < self.loss:
        self.tied.append(self.step)
        self.loss, self.step = loss, step
      else:
        self.tied.append(step)

  def patience_over(self, patience: int) -> bool:
    return patience > 0 and self.stale >= patience

  def to_json(self) -> dict:
    return {
      "score": self.score,
      "loss": self.loss,
      "step": self.step,
      "stale": self.stale,
      "tied": self.tied,
    }

  @classmethod
  def of(cls, meta: dict) -> "Best":
    """From a checkpoint's meta (`checkpoint_meta`; older ones: the score and the count only)."""
    b = meta.get("best") or {
      "score": meta.get("best_score"),
      "stale": meta.get("evals_since_best", 0),
    }
    return cls(b.get("score"), b.get("loss"), b.get("step"), b.get("stale", 0), b.get("tied", ()))


def checkpoint_meta(
  done: int, steps_per_epoch: int, val: dict, best: Best, status, trained: int
) -> dict:
  """The record of a checkpoint: the last validation figures, the run's position, its best
  evaluation, its status (`members.Status`) and the step of the state it holds (``trained``:
  earlier than ``done`` for a member frozen before it)."""
  return {
    **val,
    "step": done,
    "data_position": done,
    "epoch": done / steps_per_epoch,
    "trained_step": trained,
    "best": best.to_json(),
    "status": status.to_json(),
  }


@dataclasses.dataclass
class Record:
  """One member of a training job as the loop keeps it: who it is, where it writes, how its
  evaluations stand and how it stands (``status``: `members.Status`)."""

  member: Any  # members.Member: name, seed, weights, config
  workdir: str
  ckpts: Any  # checkpoints.Checkpoints
  out: Any  # writers.MetricWriter
  best: Best
  status: Any
  window: list = dataclasses.field(default_factory=list)  # training metrics since the last log
  val: dict = dataclasses.field(default_factory=dict)  # its last validation figures


class StopSignal:
  """SIGTERM or SIGINT (Ctrl-C) asks the job to save its checkpoints and stop (a second one
  ends the process at once, with one line and the status 128 + the signal: as after kill -9,
  the last complete checkpoints are what a re-run resumes from; unwinding Python while XLA's
  threads run could crash instead); a context manager that installs the handlers (in the
  main thread) and restores the previous ones. `requested` is the same on every process: with
  several processes it is agreed (a collective), so call it at the same steps on all of them --
  the loops ask at their logging and checkpoint steps."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:
      print(
        f"stopped: a second {signal.Signals(signum).name}: stopped at once; the last complete "
        "checkpoints are kept: re-run the same command to resume from them",
        file=sys.stderr,
        flush=True,
      )
      os._exit(128 + signum)
    self.signal = signum

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    return False

  def requested(self) -> bool:
    return not multihost.all_agree(self.signal is None)

  def check(self, workdir: str, step: int) -> None:
    """`Interrupted` when a signal stopped the job (its checkpoints at ``step`` saved)."""
    if self.signal is not None:
      raise Interrupted(
        self.signal,
        f"{signal.Signals(self.signal).name} at step {step}: the checkpoints of {workdir} are "
        "saved; re-run the same command to resume",
      )
