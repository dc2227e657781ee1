"""Weights files as NumPy arrays, without PyTorch: `read_state_dict`.

* ``.pth`` / ``.pt`` written by ``torch.save(model.state_dict(), path)`` (the zip format, torch
  >= 1.6): ``data.pkl`` is unpickled by a restricted unpickler that knows only what a state dict
  holds (tensor rebuild functions, storage and dtype names, ``OrderedDict``, plain data) and
  refuses anything else, so no pickled code ever runs; tensors are rebuilt from the raw storage
  records with their size, stride and offset.
* ``.safetensors`` (parsed here; the ``safetensors`` package is not needed) and ``.npz``.

The format is told by the file's content, not its name. Float tensors come back as float32
(half, bfloat16 and double converted), integer and bool tensors keep their dtype. A checkpoint
dict that wraps the weights in ``'state_dict'``, ``'model_state_dict'`` or ``'model'`` is
unwrapped, and a ``module.`` prefix on every key (``nn.DataParallel``) is stripped; both are
logged. Every problem raises `WeightsError` naming the file and the fix: a missing file, an
unknown format, a whole pickled model (``torch.save(model)``) instead of a state dict, PyTorch's
legacy pre-1.6 format, a pickle holding something other than named tensors.
"""

import _compat_pickle
import codecs
import collections
import io
import json
import logging
import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Optional, Union

import numpy as np

from divisive_jax.errors import UserError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMATS = "a PyTorch .pth (zip), .safetensors or .npz file"
SAVE_STATE_DICT = "torch.save(model.state_dict(), path)"


class WeightsError(UserError, ValueError):
  """A weights file or state dict that cannot be read or does not fit the model."""


# ------------------------------------------------------------------------------ reading files
# torch storage classes and dtypes -> NumPy dtype names ("bfloat16": raw uint16, converted).
_STORAGES = {
  "FloatStorage": "float32",
  "DoubleStorage": "float64",
  "HalfStorage": "float16",
  "BFloat16Storage": "bfloat16",
  "LongStorage": "int64",
  "IntStorage": "int32",
  "ShortStorage": "int16",
  "CharStorage": "int8",
  "ByteStorage": "uint8",
  "BoolStorage": "bool",
}
_TORCH_DTYPES = {
  **{n: n for n in ("float32", "float64", "float16", "bfloat16", "bool")},
  **{n: n for n in ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")},
  **{"float": "float32", "double": "float64", "half": "float16"},
  **{"long": "int64", "int": "int32", "short": "int16"},
}
_SAFETENSORS_DTYPES = {
  "BF16": "bfloat16",
  "BOOL": "bool",
  **{f"F{bits}": f"float{bits}" for bits in (16, 32, 64)},
  **{f"{k[0].upper()}{bits}": f"{k}{bits}" for k in ("int", "uint") for bits in (8, 16, 32, 64)},
}
# Pickles of PyTorch's legacy (< 1.6) format start with this magic number (protocol 2, LONG1).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def key_list(keys, limit: int = 20) -> str:
  """Sorted keys for an error message, the first `limit` of them and a count of the rest."""
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _numpy_dtype(name: str, big_endian: bool = False) -> np.dtype:
  dtype = np.dtype(np.uint16 if name == "bfloat16" else name)
  return dtype.newbyteorder(">" if big_endian else "<")


def _as_result(array: np.ndarray, name: str) -> np.ndarray:
  """Native-endian array: floats as float32 (bfloat16 bits widened), ints and bools as they are."""
  if name == "bfloat16":
    return (array.astype(np.uint32) << 16).view(np.float32)
  if array.dtype.kind == "f":
    return array.astype(np.float32, copy=False)
  return array.astype(array.dtype.newbyteorder("="), copy=False)


class _StorageType:
  """What ``torch.FloatStorage`` etc. unpickle to: just the element type (never called)."""

  def __init__(self, dtype: Optional[str]):
    self.dtype = dtype  # None: torch.UntypedStorage (bytes; the tensor names its dtype)


class _TorchDtype:
  """What ``torch.float32`` etc. unpickle to."""

  def __init__(self, name: str):
    self.name = name


class _Storage:
  """One raw storage record of the archive (shared by every tensor that views it)."""

  def __init__(self, data: bytes, dtype: Optional[str], numel: int, big_endian: bool):
    self.data, self.dtype, self.numel, self.big_endian = data, dtype, numel, big_endian


def _tensor(storage, offset, size, stride, dtype: Optional[str] = None) -> np.ndarray:
  """The array torch's ``_rebuild_tensor`` would make: ``size``/``stride`` in elements."""
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"a tensor without a storage record ({type(storage).__name__})")
  name = dtype or storage.dtype
  if name is None:
    raise pickle.UnpicklingError("a tensor on an untyped storage without a dtype")
  numpy_dtype = _numpy_dtype(name, storage.big_endian)
  if len(storage.data) % numpy_dtype.itemsize:
    raise pickle.UnpicklingError(f"a storage of {len(storage.data)} bytes holds no {name}s")
  flat = np.frombuffer(storage.data, numpy_dtype)
  size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise pickle.UnpicklingError(f"bad tensor geometry: size {size}, stride {stride}")
  if math.prod(size) == 0:
    return _as_result(np.zeros(size, numpy_dtype), name)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(
      f"tensor of size {size}, stride {stride}, offset {offset} overruns its storage of "
      f"{flat.size} elements"
    )
  view = np.lib.stride_tricks.as_strided(
    flat[offset:], size, [s * numpy_dtype.itemsize for s in stride], writeable=False
  )
  return _as_result(np.array(view, order="C"), name)  # a contiguous copy, owning its memory


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  if not isinstance(dtype, _TorchDtype):
    raise pickle.UnpicklingError(f"a tensor with dtype {dtype!r}")
  return _tensor(storage, offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  return data


def _numpy_global(name: str):
  """numpy's pickle helpers for arrays and scalars (plain data)."""
  from numpy._core import multiarray

  return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}[name]


_SAFE_GLOBALS = {
  "collections.OrderedDict": collections.OrderedDict,
  "collections.Counter": collections.Counter,
  "builtins.set": set,
  "builtins.frozenset": frozenset,
  "builtins.bytearray": bytearray,
  "builtins.complex": complex,
  "_codecs.encode": codecs.encode,  # how protocol 2 pickles bytes
  "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
  "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
  "torch._utils._rebuild_parameter": _rebuild_parameter,
  "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
  "torch.Size": tuple,
  "torch.storage.UntypedStorage": _StorageType(None),
  "torch.UntypedStorage": _StorageType(None),
  "numpy.dtype": np.dtype,
  "numpy.ndarray": np.ndarray,
  **{f"numpy.{m}.multiarray.{n}": n for m in ("core", "_core") for n in ("_reconstruct", "scalar")},
}
for _name, _dtype in _STORAGES.items():
  _SAFE_GLOBALS[f"torch.{_name}"] = _StorageType(_dtype)
for _name, _dtype in _TORCH_DTYPES.items():
  _SAFE_GLOBALS[f"torch.{_name}"] = _TorchDtype(_dtype)
_MODEL_MODULES = re.compile(r"^(torch\.nn|torchvision|timm|__main__)(\.|$)|model|net", re.I)


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch zip archive's ``data.pkl`` into NumPy arrays; refuses any other class."""

  def __init__(self, data: bytes, path: str, archive: zipfile.ZipFile, root: str):
    super().__init__(io.BytesIO(data))
    self.path, self.archive, self.root = path, archive, root
    self.storages: dict = {}
    try:
      order = archive.read(f"{root}byteorder").decode().strip()
    except KeyError:
      order = "little"  # archives from torch < 1.10 have no byteorder record
    self.big_endian = order == "big"

  def find_class(self, module: str, name: str):
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = _SAFE_GLOBALS.get(f"{module}.{name}")
    if isinstance(found, str):
      return _numpy_global(found)
    if found is not None:
      return found
    if _MODEL_MODULES.search(module) or _MODEL_MODULES.search(name):
      raise WeightsError(
        f"{self.path} is a whole pickled model (it holds a {module}.{name} object), not a "
        f"state dict; save the weights only: {SAVE_STATE_DICT}"
      )
    raise WeightsError(
      f"{self.path}: refusing to unpickle {module}.{name}: a state dict holds only tensors, "
      f"numbers and strings, and this reader runs no other pickled code; if the file is a "
      f"pickled model or training object, save the weights only: {SAVE_STATE_DICT}"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage of type {storage_type!r:.80}")
    key = key.decode() if isinstance(key, bytes) else str(key)
    if key not in self.storages:
      try:
        data = self.archive.read(f"{self.root}data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
      self.storages[key] = _Storage(data, storage_type.dtype, int(numel), self.big_endian)
    return self.storages[key]


def _read_torch_zip(path: str, archive: zipfile.ZipFile, root: str):
  try:
    return _StateDictUnpickler(archive.read(f"{root}data.pkl"), path, archive, root).load()
  except WeightsError:
    raise
  except Exception as e:  # a corrupt or hostile pickle: never more than an error
    raise WeightsError(
      f"{path} is a PyTorch zip archive whose data.pkl cannot be read as a state dict "
      f"({type(e).__name__}: {e}); re-save it with {SAVE_STATE_DICT}"
    ) from e


def _read_safetensors(path: str, data: bytes) -> dict:
  def bad(why):
    return WeightsError(f"{path} is not a valid .safetensors file: {why}")

  n = int.from_bytes(data[:8], "little")
  try:
    header = json.loads(data[8 : 8 + n])
  except ValueError as e:
    raise bad(f"unreadable JSON header ({e})") from e
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  buffer = memoryview(data)[8 + n :]
  state = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      name = _SAFETENSORS_DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise bad(f"tensor {key!r} has dtype/shape/data_offsets {info!r:.200}") from e
    dtype = _numpy_dtype(name)
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(buffer):
      raise bad(f"tensor {key!r}: shape {shape} or offsets {begin}..{end} out of range")
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise bad(f"tensor {key!r}: {end - begin} bytes for shape {shape} of {info['dtype']}")
    array = np.frombuffer(buffer[begin:end], dtype).reshape(shape)
    state[key] = _as_result(np.array(array), name)
  return state


def _read_npz(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as npz:
      state = {key: npz[key] for key in npz.files}
  except ValueError as e:  # object arrays need pickle, which is not allowed
    raise WeightsError(f"{path}: a .npz holding Python objects, not only arrays ({e})") from e
  for key, array in state.items():
    if array.dtype.kind not in "fiub":
      raise WeightsError(f"{path}: array {key!r} has dtype {array.dtype}, not a numeric tensor")
  return state


def _read_zip(path: str) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise WeightsError(f"{path} looks like a zip archive but cannot be opened: {e}") from e
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or re.fullmatch(r"[^/]+/data\.pkl", n)]
    if pickles:
      return _read_torch_zip(path, archive, pickles[0][: -len("data.pkl")])
    if names and all(n.endswith(".npy") for n in names):
      return _read_npz(path)
  raise WeightsError(
    f"{path} is a zip archive but not {FORMATS} (no data.pkl, not only .npy members: "
    f"{', '.join(names[:5]) or 'empty'})"
  )


def _unwrap(obj: Any, path: str) -> dict:
  """A mapping of names to arrays: the object itself, or its 'state_dict'-like entry."""

  def is_state_dict(x):
    return isinstance(x, Mapping) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) and v.dtype.kind in "fiub"
      for k, v in x.items()
    )

  if not isinstance(obj, Mapping):
    raise WeightsError(
      f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of parameter names "
      f"to tensors); save one with {SAVE_STATE_DICT}"
    )
  if not is_state_dict(obj):
    for key in ("state_dict", "model_state_dict", "model"):
      if is_state_dict(obj.get(key)) and obj[key]:
        others = [str(k) for k in obj if k != key]
        log.info("%s: using its %r entry as the state dict (besides: %s)", path, key, others)
        obj = obj[key]
        break
    else:
      key, value = next((k, v) for k, v in obj.items() if not is_state_dict({k: v}))
      raise WeightsError(
        f"{path} is not a state dict: its entry {key!r} is a {type(value).__name__}, not a "
        "tensor, and it has no 'state_dict', 'model_state_dict' or 'model' entry mapping "
        f"names to tensors; save the weights with {SAVE_STATE_DICT}"
      )
  if not obj:
    raise WeightsError(f"{path} holds an empty state dict")
  state = {k: _as_result(v, str(v.dtype)) for k, v in obj.items()}  # arrays pickled by numpy
  if all(k.startswith("module.") for k in state):
    log.info("%s: stripping the 'module.' prefix (nn.DataParallel) from every key", path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
  return state


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """The state dict in a weights file, as NumPy arrays; no PyTorch needed.

  Reads a PyTorch zip ``.pth``/``.pt`` (``torch.save`` >= 1.6), a ``.safetensors`` or a
  ``.npz`` (told by content). Floats come back as float32, integers/bools as stored. Unwraps a
  checkpoint's ``'state_dict'``/``'model_state_dict'``/``'model'`` entry and a ``module.`` key
  prefix (logged). Raises `WeightsError` naming the file and the fix otherwise.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise WeightsError(f"Weights file {path} does not exist; check model.pretrained_path")
  if os.path.isdir(path):
    raise WeightsError(
      f"Weights path {path} is a directory; give the weights file itself ({FORMATS})"
    )
  with open(path, "rb") as f:
    head = f.read(512)
  size = os.path.getsize(path)
  if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    obj = _read_zip(path)
  elif head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar":
    raise WeightsError(
      f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which is not read here; "
      "re-save it with a current torch (torch.save(torch.load(path), new_path)) or export it "
      "to .safetensors/.npz"
    )
  elif size >= 10 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
    with open(path, "rb") as f:
      obj = _read_safetensors(path, f.read())
  else:
    kind = {b"\x80": " (a plain pickle?)", b"\x93": " (a single .npy array?)"}.get(head[:1], "")
    raise WeightsError(
      f"{path} is not {FORMATS}{kind}; it starts with {head[:16]!r}. Save weights with "
      f"{SAVE_STATE_DICT}, or as .safetensors/.npz"
    )
  return _unwrap(obj, path)
