"""One workdir = one experiment: an exclusive lock, its kind, and the stored config checked on
resume.

* `Lock`: process 0 of a training job holds an exclusive ``fcntl.flock`` on ``<workdir>/.lock``
  for the whole run (the file names the holder: pid, host, start time, command). A second run
  on the same workdir is refused at once with that information. The kernel releases the lock
  when its process exits, however it exits (kill -9 included), so a stale lock of a dead process
  never blocks: the next run takes it and logs that the previous holder is gone. Readers
  (`divisive_jax.evaluate`, `divisive_jax.explain`) take no lock; `training` says who trains a
  run (its lock or its population's), and `evaluate`, which writes into the run, refuses then.
* `check_config`: on resume (a checkpoint exists) the config is compared with the stored
  ``config.json``: identical -> resume; only fields of `config_base.SAFE_ON_RESUME` differ
  (logging cadence, final evaluation, ...) -> resume and log them; anything else -> refuse,
  listing the fields, unless ``allow_change`` (the ``--allow_config_change`` flag), in which case
  the old config is appended to ``config_history.jsonl`` with the step it was replaced at.
* `check_kind`: a workdir holds one kind of experiment -- a single run, a population (its
  ``members/``) or a sweep (``sweep_settings.json``) -- and a job of another kind is refused
  before it writes anything there (it would overwrite the root ``config.json``).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys

from absl import logging

from divisive_jax import config_base, jsonio, layout
from divisive_jax.errors import WorkdirError

_MAX_LISTED = 12


def check_kind(workdir: str, kind: str) -> None:
  """Refuse a job of ``kind`` in a workdir that holds another kind of experiment."""
  found = layout.kind_of(workdir)
  if found not in (None, kind):
    raise WorkdirError(
      f"{workdir} holds {layout.KINDS[found]}; {layout.KINDS[kind]} needs a workdir of its own. "
      "Fix: use another --workdir"
    )


class Lock:
  """An exclusive lock on a workdir (see module docstring); a context manager."""

  def __init__(self, workdir: str):
    self.path = layout.path(workdir, layout.LOCK)
    self._fd = None

  def acquire(self) -> "Lock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
      os.close(fd)
      raise WorkdirError(
        f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); wait for "
        "it to finish, stop it, or use another --workdir"
      ) from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
      logging.info(
        "Took over the lock of a run that is no longer running (%s)", _describe(previous)
      )
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def training(workdir: str) -> str | None:
  """Who trains ``workdir`` now -- its own job, or the population or sweep it is a member of
  (their locks, held) -- as text, else None: read-only commands that would write into a run
  (`divisive_jax.evaluate`) refuse a run in training."""
  folder = os.path.abspath(workdir)
  for _ in range(5):  # the run, members/, its population, the method folder, the sweep
    path = layout.path(folder, layout.LOCK)
    if os.path.exists(path):
      fd = os.open(path, os.O_RDONLY)
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
      except BlockingIOError:
        return f"{folder} is training ({_describe(os.pread(fd, 4096, 0).decode(errors='replace'))})"
      finally:
        os.close(fd)
    folder = os.path.dirname(folder)
  return None


@contextlib.contextmanager
def exclusive(workdir: str):
  """The workdir's `Lock` for a job of one or several processes: process 0 takes it, and every
  process raises `WorkdirError` when it could not (the processes agree before going on)."""
  from divisive_jax import multihost

  lock, problem = None, None
  if multihost.is_lead():
    try:
      lock = Lock(workdir).acquire()
    except WorkdirError as e:
      problem = e
  if not multihost.all_agree(problem is None):
    raise problem or WorkdirError(f"{workdir} is in use by another run (seen by process 0)")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"


def check_config(workdir: str, config, resuming: bool, allow_change: bool, step: int | None):
  """Compare ``config`` with the stored one when resuming; refuse unsafe changes (module doc).
  Returns the changed fields (empty when identical or not resuming)."""
  if not (resuming and os.path.exists(layout.path(workdir, layout.CONFIG))):
    return []
  old = config_base.load(workdir)
  changed = config_base.differences(old, config)
  unsafe = config_base.unsafe_differences(old, config)
  listing = "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in (unsafe or changed)[:_MAX_LISTED])
  more = len(unsafe or changed) - _MAX_LISTED
  listing += f"; and {more} more" if more > 0 else ""
  if unsafe and not allow_change:
    raise WorkdirError(
      f"{workdir} holds another experiment: its config.json differs in {listing}. Fix: use a "
      "new --workdir for a new experiment, or add --allow_config_change to continue this run's "
      "checkpoint with the new config (the old one is kept in config_history.jsonl)"
    )
  if unsafe:
    logging.warning("Continuing the checkpoint at step %s with a changed config: %s", step, listing)
    from divisive_jax import multihost

    if multihost.is_lead():
      entry = {"replaced_at_step": step, "config": json.loads(config_base.to_json(old))}
      with open(layout.path(workdir, layout.CONFIG_HISTORY), "a") as f:
        f.write(jsonio.dumps(entry, None) + "\n")
  elif changed:
    logging.info("Resuming with changed settings that do not affect training: %s", listing)
  return changed
