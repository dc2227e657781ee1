"""Run outputs: `metrics.jsonl`, TensorBoard event files and a console progress line.

TensorBoard events are written with the `tensorboard` package's own event writer and protos, so
TensorFlow is not needed (clu's metric writers import TensorFlow at load). Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as std_logging
import math
import os
import socket
import threading
import time

import numpy as np
from absl import logging

from divisive_jax import jsonio, layout
from divisive_jax.errors import WorkdirError, disk_full

# The console gets a progress line at least this often (the first one within this many seconds
# of the first step, whatever log_every_steps is); metrics.jsonl keeps its step cadence.
LOG_EVERY_SECONDS = 30.0


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

  TensorBoard events are written synchronously in this thread (tensorboard's own record
  format and protos), so a failed write -- a full disk -- is one `WorkdirError` here rather than
  a traceback from a writer thread.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = layout.path(workdir, layout.METRICS)
    self._tb = None
    if enabled:
      from tensorboard.summary.writer.record_writer import RecordWriter

      folder = layout.path(workdir, layout.TENSORBOARD)
      os.makedirs(folder, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
      self._tb_path = os.path.join(folder, name)
      with _disk_errors(self._tb_path):
        self._tb = RecordWriter(open(self._tb_path, "wb"))
      self._event(file_version="brain.Event:2")

  def _event(self, **fields) -> None:
    from tensorboard.compat.proto import event_pb2

    with _disk_errors(self._tb_path):
      self._tb.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())

  def truncate_after(self, step: int) -> None:
    """Drop records of steps after ``step``: on resume (those steps are redone) and when a run
    stops on a non-finite loss (its records after the last checkpoint are not part of it)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:  # a line cut short by a kill or a full disk
          continue
        if record["step"] <= step:
          kept.append(line)
    with _disk_errors(self.path):
      jsonio.write_text(self.path, "".join(kept))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with _disk_errors(self.path), open(self.path, "a") as f:
      f.write(jsonio.dumps(record, indent=None) + "\n")
    from tensorboard.compat.proto import summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._event(step=int(step), summary=summary_pb2.Summary(value=values))

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """images: name -> uint8 (H, W, 3) array."""
    if not self.enabled:
      return
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2

    values = []
    for tag, img in images.items():
      buf = io.BytesIO()
      Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
      h, w = img.shape[:2]
      image = summary_pb2.Summary.Image(
        height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue()
      )
      values.append(summary_pb2.Summary.Value(tag=tag, image=image))
    self._event(step=int(step), summary=summary_pb2.Summary(value=values))

  def flush(self) -> None:
    if self._tb is not None:
      with _disk_errors(self._tb_path):
        self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      with contextlib.suppress(OSError):
        self._tb.close()
      self._tb = None


def _disk_errors(path: str):
  """A failed write of ``path`` for lack of space -> one `WorkdirError` line."""
  return disk_full(
    WorkdirError, lambda reason: f"{reason} while writing {path}; free space and re-run"
  )


class Progress:
  """Console progress: step/total, steps/s and ETA, from wall-clock since the first step.

  The rate counts from the first completed step after (re)starting, so compilation does not
  distort it; `due` says when a line is owed by time (`LOG_EVERY_SECONDS`).
  """

  def __init__(self, first_step: int, total_steps: int):
    self.first, self.total = first_step, total_steps
    self.t0 = None
    self.last = time.time()

  def due(self) -> bool:
    return time.time() - self.last >= LOG_EVERY_SECONDS

  def line(self, step: int, scalars: dict) -> str:
    now = time.time()
    if self.t0 is None:
      self.t0 = (now, step)
    done = step - self.t0[1]
    rate = done / (now - self.t0[0]) if done > 0 else float("nan")
    eta = (self.total - step) / rate if done > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
    shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k in _SHOWN)
    speed = f"{rate:.2f} steps/s ETA {eta_s}" if done > 0 else "(measuring speed)"
    return f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%) {shown} {speed}"

  def log(self, step: int, scalars: dict) -> None:
    self.last = time.time()
    logging.info(self.line(step, scalars))


_SHOWN = ("loss", "accuracy", "val/accuracy", "val/auroc", "lr")


class Heartbeat:
  """While the block runs (a compilation: the first step of a big population can take minutes),
  a line every ``every`` seconds says what is going on and for how long; nothing when it is
  quicker; none at all when not ``active``. ``log``: where the lines go (absl's INFO)."""

  def __init__(self, what: str, active: bool = True, every: float | None = None, log=None):
    self.what, self.active, self.log = what, active, log or logging.info
    self.every = max(LOG_EVERY_SECONDS if every is None else every, 0.01)
    self._done = threading.Event()

  def _beat(self) -> None:
    t0 = time.time()
    while not self._done.wait(self.every):
      self.log(f"{self.what}: {time.time() - t0:.0f} s so far")

  def __enter__(self):
    self._thread = threading.Thread(target=self._beat, daemon=True) if self.active else None
    if self._thread:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    if self._thread:
      self._thread.join()  # no line after the block


# Libraries whose INFO records are chatter in our runs (their warnings still show). Those that
# use Python logging get a level on their logger; those that log through absl (orbax) are
# recognised by where the record comes from, with a filter on absl's handler.
QUIET_LOGGERS = ("jax._src.xla_bridge", "jax._src.distributed", "tensorflow_datasets", "etils")
QUIET_PACKAGES = ("orbax", "tensorflow_datasets", "etils", "array_record")

# tensorflow-datasets' own warnings are about its builder machinery ("Using custom data
# configuration", "has no dataset_info.json" on every preparation); our data layer reports the
# data's problems itself, so only tfds' errors show.
ERRORS_ONLY_PACKAGES = ("tensorflow_datasets",)

# Known library warnings that are not news in our runs. orbax warns "Requested `tracked_metric`;
# did not provide metrics" for every checkpoint saved without a score: ours are, by design, at
# steps without a validation evaluation (`checkpoints.Checkpoints.save`), which keeps them out of
# the best-checkpoint choice.
EXPECTED_WARNINGS = (("orbax", "Requested `tracked_metric`; did not provide metrics"),)


def _from(record, packages) -> bool:
  """Whether a log record comes from a module of one of ``packages``."""
  return any(f"{os.sep}{p}{os.sep}" in record.pathname for p in packages)


class _LibraryInfoFilter(std_logging.Filter):
  def filter(self, record) -> bool:
    if _from(record, ERRORS_ONLY_PACKAGES):
      return record.levelno >= std_logging.ERROR
    if record.levelno < std_logging.ERROR and any(
      _from(record, [p]) and str(record.msg).startswith(text) for p, text in EXPECTED_WARNINGS
    ):
      return False
    return record.levelno >= std_logging.WARNING or not _from(record, QUIET_PACKAGES)


def quiet_library_logs() -> None:
  """The log as a story of the run: the INFO chatter of the libraries (jax's TPU-backend probe,
  orbax's file operations, tensorflow-datasets' preparation messages) is silenced by configuring
  their loggers; their warnings still show. (tfds' progress bars: `data.csv_dataset.load`.)"""
  for name in QUIET_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def write_configs(config, workdir: str, members, dirs, info: dict) -> None:
  """The job's ``config.json`` and ``data_info.json``, and each member's in its workdir."""
  from divisive_jax import config_base

  own = [(m.config, d) for m, d in zip(members, dirs) if d != workdir]
  for c, d in [(config, workdir), *own]:
    os.makedirs(d, exist_ok=True)
    jsonio.write_text(layout.path(d, layout.CONFIG), config_base.to_json(c) + "\n")
    jsonio.write_json(layout.path(d, layout.DATA_INFO), info)


def write_parameters(config, state, dirs: list[str], lead: bool) -> None:
  """Each member's ``parameters.txt`` (clu's table: names, shapes, sizes, statistics) in its
  workdir of ``dirs``, from the members' ``state``."""
  from clu import parameter_overview

  from divisive_jax import step as step_lib

  n = len(dirs)
  if lead:
    for d, params in zip(dirs, step_lib.split_members(state.params, n)):
      table = parameter_overview.get_parameter_overview(params) + "\n"
      jsonio.write_text(layout.path(d, layout.PARAMETERS), table)
  count = parameter_overview.count_parameters(state.params) // n
  logging.info("Model %s: %s parameters (table in parameters.txt)", config.model.name, f"{count:,}")
