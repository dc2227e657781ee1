"""Per-example scores on disk: ``scores_<split>.csv`` and the cache of validation scores.

``scores_<split>.csv``: header ``id,label,attack_type,score,pred``; label and pred are class
indices, attack_type is the type name ('' for bona fide / unknown), score = P(class 1).

Validation scores fix the test thresholds. The final evaluation of a run passes them in memory;
`divisive_jax.evaluate` on another split reuses ``scores_val.csv`` when its sidecar
``scores_val.meta.json`` matches the checkpoint (step and a SHA-1 of the restored weights) and
the validation data (a digest of ``config.data``, the data fingerprint and the validation
label / attack-type / map columns), and runs validation again otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import jax
import numpy as np

from divisive_jax import jsonio, layout

HEADER = ("id", "label", "attack_type", "score", "pred")


def write_csv(path: str, result: dict, attack_types) -> None:
  """``result``: per-example arrays id, label, attack_type (indices), score, pred."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(HEADER)
  for i, lab, at, s, p in zip(*(result[k] for k in HEADER)):
    at = int(at)
    name = attack_types[at] if 0 <= at < len(attack_types) else ""
    w.writerow([str(i), int(lab), name, repr(float(s)), int(p)])
  jsonio.write_text(path, buf.getvalue())


def read_csv(path: str) -> dict[str, np.ndarray]:
  """-> {'id', 'label', 'attack_type' (names), 'score', 'pred'} numpy arrays."""
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = tuple(next(reader, ()))
    if header != HEADER:
      raise ValueError(f"{path}: header {header} != {HEADER}")
    rows = list(reader)
  cols = list(zip(*rows)) if rows else [()] * len(HEADER)
  dtypes = (str, np.int64, str, np.float64, np.int64)
  return {k: np.array(cols[i], dtype=t) for i, (k, t) in enumerate(zip(HEADER, dtypes))}


def params_digest(variables) -> str:
  """SHA-1 of the restored weights (params + batch_stats; this process's replica)."""
  h = hashlib.sha1()
  for leaf in jax.tree.leaves((variables["params"], variables["batch_stats"])):
    a = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def val_cache_key(step: int, variables, splits, data_config) -> dict:
  """What cached validation scores depend on: the weights and the validation data."""
  h = hashlib.sha1(json.dumps(data_config.to_dict(), sort_keys=True, default=str).encode())
  h.update(str(splits.info.get("fingerprint", "")).encode())
  for column in ("label", "attack_type", "has_saliency"):  # cheap: read without decoding
    h.update(np.asarray(getattr(splits.val, column), np.int64).tobytes())
  return {
    "checkpoint_step": int(step),
    "params_digest": params_digest(variables),
    "n_examples": int(len(splits.val)),
    "data_digest": h.hexdigest(),
  }


def load_val(workdir: str, key: dict) -> dict | None:
  """Cached validation scores matching ``key``, else None."""
  try:
    meta = jsonio.read_json(layout.scores_file(workdir, "val", ".meta.json"))
    if {k: meta.get(k) for k in key} != key:
      return None
    cached = read_csv(layout.scores_file(workdir, "val"))
  except (OSError, ValueError, KeyError):
    return None
  if len(cached["score"]) != key["n_examples"] or not np.all(np.isfinite(cached["score"])):
    return None
  return cached


def forget_val(workdir: str) -> None:
  """Drop the key before ``scores_val.csv`` is rewritten (a crash in between leaves no cache)."""
  try:
    os.remove(layout.scores_file(workdir, "val", ".meta.json"))
  except FileNotFoundError:
    pass


def save_val_key(workdir: str, key: dict) -> None:
  """Mark ``scores_val.csv`` (written by the PAD evaluator) as the scores of ``key``."""
  jsonio.write_json(layout.scores_file(workdir, "val", ".meta.json"), key)
