"""Pieces shared by the training loops of one run (`train`) and of a population (`population`).

* `Cadence`: the steps at which a run logs, evaluates and checkpoints, and how many steps the
  next dispatch may run so that these events land on exact steps.
* `Best`: the best validation score so far and the evaluations since (early stopping; of two
  equal scores the earlier stays best, as in `checkpoints`).
* `checkpoint_meta`: the JSON record saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Cadence:
  eval_every: int
  ckpt_every: int
  log_every: int
  total: int

  @classmethod
  def from_config(cls, config, steps_per_epoch: int, total_steps: int) -> "Cadence":
    eval_every = int(config.eval_every_steps) or max(
      1, int(round(float(config.eval_every_epochs) * steps_per_epoch))
    )
    return cls(
      eval_every=eval_every,
      ckpt_every=int(config.checkpoint_every_steps) or eval_every,
      log_every=max(1, int(config.log_every_steps)),
      total=total_steps,
    )

  def logs(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.total

  def evaluates(self, done: int) -> bool:
    return done % self.eval_every == 0 or done == self.total

  def checkpoints(self, done: int) -> bool:
    return self.evaluates(done) or done % self.ckpt_every == 0

  def dispatch(self, step: int, k_max: int) -> int:
    """Steps to run from ``step``: ``k_max`` unless an event falls inside, then 1."""
    k = min(k_max, self.total - step)
    if any(self.logs(d) or self.checkpoints(d) for d in range(step + 1, step + k)):
      return 1
    return k


class Best:
  """The best validation score (higher is better) and the evaluations since it."""

  def __init__(self, score=None, stale: int = 0):
    self.score = -math.inf if score is None else float(score)
    self.stale = int(stale)

  def update(self, score: float) -> None:
    if score > self.score:
      self.score, self.stale = score, 0
    else:
      self.stale += 1

  def patience_over(self, patience: int) -> bool:
    return patience > 0 and self.stale >= patience


def checkpoint_meta(done: int, steps_per_epoch: int, best: Best, val: dict, **extra) -> dict:
  """The record of a checkpoint: the last validation figures, then the run's position."""
  return {
    **val,
    "step": done,
    "data_position": done,
    "epoch": done / steps_per_epoch,
    "best_score": best.score,
    "evals_since_best": best.stale,
    **extra,
  }


class StopSignal:
  """SIGTERM asks the job to save a checkpoint and exit; a context manager that installs the
  handler (in the main thread) and restores the previous one. `requested` is the same on every
  process: with several processes it is agreed (a collective), so call it at the same steps on
  all of them -- the loops ask at their logging and checkpoint steps."""

  def __init__(self):
    self.signal, self._previous = None, None

  def __enter__(self):
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    import signal

    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def requested(self) -> bool:
    from divisive_jax import multihost

    return not multihost.all_agree(self.signal is None)
