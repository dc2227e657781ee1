"""JSON policy and atomic writes: the one place where the project's files are written.

Policy: numpy scalars and arrays become Python numbers and lists; a non-finite float (NaN,
+-inf) becomes ``null`` -- in every JSON file and every ``metrics.jsonl`` line -- so each file
is strict JSON that any reader accepts (``allow_nan=False`` enforces it). ``null`` therefore
means "undefined for this data" (e.g. AUROC of a split with one class).

Writes are atomic: the text goes to a temporary file in the same folder, which is renamed over
the target, so a reader (or a run killed mid-write) never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def to_jsonable(obj: Any) -> Any:
  """Recursively: numpy -> Python, non-finite floats -> None, tuples -> lists, keys -> str."""
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
  """Strict JSON text of ``obj`` under the policy above."""
  return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def write_text(path: str, text: str) -> None:
  """Atomically replace ``path`` with ``text``."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
  write_text(path, dumps(obj, indent) + "\n")


def read_json(path: str, fix: str = "restore it from a copy or delete it") -> Any:
  """The JSON of ``path``; a damaged file (cut short, edited by hand) is one `DamagedFileError`
  naming the file, where it breaks and ``fix``."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    from divisive_jax.errors import DamagedFileError

    where = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
    raise DamagedFileError(f"{path} is not valid JSON ({where}); {fix}") from None
