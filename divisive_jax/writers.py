"""Run outputs: `metrics.jsonl`, TensorBoard event files and a console progress line.

TensorBoard events are written with the `tensorboard` package's own event writer and protos, so
TensorFlow is not needed (clu's metric writers import TensorFlow at load). Only process 0 writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

import numpy as np
from absl import logging


def _jsonable(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter

      self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """On resume: drop records of steps after the restored checkpoint (they are redone)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._tb.add_event(
      event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
    )

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """images: name -> uint8 (H, W, 3) array."""
    if not self.enabled:
      return
    from PIL import Image
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = []
    for tag, img in images.items():
      buf = io.BytesIO()
      Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
      h, w = img.shape[:2]
      values.append(
        summary_pb2.Summary.Value(
          tag=tag,
          image=summary_pb2.Summary.Image(
            height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue()
          ),
        )
      )
    self._tb.add_event(
      event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
    )

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Console progress: step/total, steps/s and ETA, from wall-clock since the first step."""

  def __init__(self, first_step: int, total_steps: int):
    self.first, self.total = first_step, total_steps
    self.t0 = None

  def line(self, step: int, scalars: dict) -> str:
    now = time.time()
    if self.t0 is None:
      self.t0 = (now, step)
    done = step - self.t0[1]
    rate = done / (now - self.t0[0]) if done > 0 else float("nan")
    eta = (self.total - step) / rate if done > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
    shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k in _SHOWN)
    return (
      f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%) {shown} "
      f"{rate:.2f} steps/s ETA {eta_s}"
    )

  def log(self, step: int, scalars: dict) -> None:
    logging.info(self.line(step, scalars))


_SHOWN = ("loss", "accuracy", "val/accuracy", "val/auroc", "lr")


class _DropLibraryInfo:
  """A logging filter dropping INFO records of chatty libraries (orbax logs every file op)."""

  def __init__(self, packages: tuple[str, ...]):
    self.markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record) -> bool:
    import logging as std_logging

    return record.levelno >= std_logging.WARNING or not any(
      m in record.pathname for m in self.markers
    )


def quiet_library_logs(packages: tuple[str, ...] = ("orbax",)) -> None:
  """Keep the console readable: warnings of `packages` still show, their INFO lines do not."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo(packages))
