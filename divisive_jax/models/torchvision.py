"""Import torchvision weights (e.g. ImageNet-pretrained ResNet-18/50, DenseNet-121 state dicts).

No PyTorch needed: `read_state_dict` reads a weights file into NumPy arrays itself.

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
logged. Every problem raises `WeightsError` (a ValueError) naming the file and the fix: a
missing file, an unknown format, a whole pickled model (``torch.save(model)``) instead of a state
dict, PyTorch's legacy pre-1.6 format, a pickle holding something other than named tensors.

Key mapping (our modules mirror torchvision's names, see `resnet` and `densenet`):
    ``layer1.0.downsample.1.running_var`` -> ``batch_stats/backbone/layer1_0/downsample_1/var``
    ``features.denseblock1.denselayer1.conv1.weight``
        -> ``params/backbone/denseblock1/denselayer1/conv1/kernel``
    ``fc.*`` / ``classifier.*`` -> ``params/head/*``
Tensor layouts: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); linear weight (out, in) ->
kernel (in, out); BN weight/bias/running_mean/running_var -> scale/bias/mean/var.

`check_state_dict` validates keys and shapes against abstract variables (``jax.eval_shape`` of
``model.init``) cheaply, before any data is prepared; `load_torchvision_state_dict` loads.
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

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMATS = "a PyTorch .pth (zip), .safetensors or .npz file"
SAVE_STATE_DICT = "torch.save(model.state_dict(), path)"


class WeightsError(ValueError):
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
  "F64": "float64",
  "F32": "float32",
  "F16": "float16",
  "BF16": "bfloat16",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U64": "uint64",
  "U32": "uint32",
  "U16": "uint16",
  "U8": "uint8",
  "BOOL": "bool",
}
# Pickles of PyTorch's legacy (< 1.6) format start with this magic number (protocol 2, LONG1).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


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


# ----------------------------------------------------------------------------- key mapping
HEADS = {"resnet18": "fc", "resnet50": "fc", "densenet121": "classifier"}
# torchvision's DenseNet loader renames legacy keys such as 'denselayer1.norm.1.weight'.
_LEGACY_DENSENET = re.compile(  # group 1 + group 2 is the current key
  r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
  r"((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_STEM_KEYS = ("conv1.weight", "features.conv0.weight")
_BN_LEAVES = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor; .float() also covers half/bfloat16 tensors
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def _target(key: str, model_name: str):
  """torchvision key -> (module path below 'backbone', leaf); 'layer1.0' -> 'layer1_0'."""
  if model_name.startswith("densenet"):
    key = _LEGACY_DENSENET.sub(r"\1\2", key).removeprefix("features.")
  *module, leaf = key.split(".")
  path = []
  for part in module:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path), leaf


def _our_key(module: tuple, leaf: str, flat) -> Optional[tuple]:
  """Our flat variable key for a torchvision (module, leaf), None when we have no such leaf."""
  if ("params", *module, "scale") in flat:  # a BatchNorm
    col, ours = _BN_LEAVES.get(leaf, (None, None))
  else:
    col, ours = "params", {"weight": "kernel", "bias": "bias"}.get(leaf)
  target = (col, *module, ours)
  return target if target in flat else None


def _hint(key: str, theirs: tuple, ours: tuple, model_name: str) -> str:
  if key in _STEM_KEYS and theirs[:3] != ours[:3]:
    return (
      "torchvision weights need model.stem='imagenet' and 3-channel input (replicate "
      "gray images to 3 channels)"
    )
  return f"check model.name (now {model_name!r}) and model.width (64 for torchvision weights)"


def _names(keys, limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _state_and_source(path_or_state_dict) -> tuple[Mapping[str, Any], str]:
  if isinstance(path_or_state_dict, Mapping):
    return path_or_state_dict, "State dict"
  return read_state_dict(path_or_state_dict), os.fspath(path_or_state_dict)


def _flat(variables) -> dict:
  return {
    (col, *path): leaf
    for col in ("params", "batch_stats")
    for path, leaf in traverse_util.flatten_dict(variables[col]).items()
  }


def _match(state: Mapping[str, Any], model_config, flat, source: str) -> dict:
  """Our flat key -> NumPy array in our layout, for every state dict entry we load; raises
  `WeightsError` on unexpected keys, missing backbone variables or a shape mismatch."""
  name = getattr(model_config, "name", None)
  if name not in HEADS:
    raise WeightsError(f"No torchvision weights for model {name!r}; supported: {sorted(HEADS)}")
  loaded, unexpected, head = {}, [], {}
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue
    module, leaf = _target(key, name)
    if module == (HEADS[name],):
      head[leaf] = _to_numpy(value)
      continue
    target = _our_key(("backbone", *module), leaf, flat)
    if target is None:
      unexpected.append(key)
      continue
    array = _to_numpy(value)
    if target[-1] == "kernel":  # (O, I, kh, kw) -> (kh, kw, I, O); (out, in) -> (in, out)
      array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    if array.shape != flat[target].shape:
      raise WeightsError(
        f"{source}: {key}: state dict shape {tuple(np.shape(value))} (converted {array.shape}) "
        f"does not fit our {'/'.join(target)} of shape {tuple(flat[target].shape)}; likely fix: "
        f"{_hint(key, array.shape, tuple(flat[target].shape), name)}"
      )
    loaded[target] = array

  missing = ["/".join(k) for k in flat if k[1] == "backbone" and k not in loaded]
  if unexpected or missing:
    raise WeightsError(
      f"{source} does not match a torchvision {name}: unexpected keys "
      f"[{_names(unexpected)}], missing variables [{_names(missing)}]; check model.name"
    )
  loaded.update(_head(head, flat, name))
  return loaded


def check_state_dict(path_or_state_dict, model_config, variables) -> Mapping[str, Any]:
  """Validates a weights file (or state dict) against ``variables`` without loading it.

  ``variables`` may be abstract (``jax.eval_shape(model.init, ...)``), so this is cheap enough
  to run before any data is prepared. Raises `WeightsError` as `load_torchvision_state_dict`
  would. Returns the state dict it checked (read from the file when given a path), to pass on
  to `load_torchvision_state_dict` without reading the file again.
  """
  state, source = _state_and_source(path_or_state_dict)
  _match(state, model_config, _flat(variables), source)
  return state


def load_torchvision_state_dict(path_or_state_dict, model_config, variables):
  """Returns ``variables`` ({'params', 'batch_stats'}) with a torchvision state dict loaded.

  ``path_or_state_dict``: a weights file read by `read_state_dict` (``.pth`` zip,
  ``.safetensors`` or ``.npz``; no PyTorch needed) or a mapping from torchvision keys to
  tensors/arrays. ``model_config.name`` must be resnet18, resnet50 or densenet121.
  ``variables`` may be abstract (``jax.eval_shape`` of ``model.init``) only where the state
  dict provides every leaf, head included.

  The classifier (``fc`` / ``classifier``) is loaded into ``head`` when its shape matches ours;
  otherwise (ImageNet's 1000 classes vs our ``num_outputs``) our head is kept and the fact
  logged. Every backbone variable must be provided and every key used (``num_batches_tracked``
  is ignored); otherwise `WeightsError` (a ValueError) naming the keys. A shape mismatch raises
  `WeightsError` naming the key, both shapes and the likely fix.
  """
  state, source = _state_and_source(path_or_state_dict)
  flat = _flat(variables)
  loaded = _match(state, model_config, flat, source)
  return {
    col: traverse_util.unflatten_dict(
      {
        k[1:]: jnp.asarray(loaded[k], v.dtype) if k in loaded else v
        for k, v in flat.items()
        if k[0] == col
      }
    )
    for col in ("params", "batch_stats")
  }


def _head(head: Mapping[str, np.ndarray], flat, model_name: str):
  """The head variables to load: both when the classifier has our shape, else none."""
  kernel = flat[("params", "head", "kernel")]
  bias = flat[("params", "head", "bias")]
  ours = {"weight": tuple(kernel.shape[::-1]), "bias": tuple(bias.shape)}
  if set(head) - set(ours):
    raise WeightsError(f"Unexpected classifier keys {sorted(head)} in a {model_name} state dict")
  theirs = {k: v.shape for k, v in head.items()}
  if theirs == ours:
    return {
      ("params", "head", "kernel"): head["weight"].T,
      ("params", "head", "bias"): head["bias"],
    }
  log.info(
    "Keeping the freshly initialised head: the state dict classifier has shapes %s, "
    "ours %s (torch layout).",
    theirs,
    ours,
  )
  return {}
