"""Import torchvision weights (e.g. ImageNet-pretrained ResNet-18/50, DenseNet-121 state dicts;
ViTs of torchvision and timm through `vit_weights`).

No PyTorch needed: files are read by `weights_file.read_state_dict` (.pth, .safetensors, .npz).

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

import logging
import os
import re
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from divisive_jax.models import vit_weights
from divisive_jax.models.weights_file import WeightsError, key_list, read_state_dict

__all__ = ["WeightsError", "read_state_dict", "check_state_dict", "load_torchvision_state_dict"]

log = logging.getLogger(__name__)

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


def _state_and_source(path_or_state_dict) -> tuple[Mapping[str, Any], str]:
  if isinstance(path_or_state_dict, Mapping):
    return path_or_state_dict, "State dict"
  return read_state_dict(path_or_state_dict), os.fspath(path_or_state_dict)


def _flat(variables) -> dict:
  return {
    (col, *path): leaf
    for col in ("params", "batch_stats")
    for path, leaf in traverse_util.flatten_dict(variables.get(col, {})).items()
  }


def _match(state: Mapping[str, Any], model_config, flat, source: str) -> dict:
  """Our flat key -> NumPy array in our layout, for every state dict entry we load; raises
  `WeightsError` on unexpected keys, missing backbone variables or a shape mismatch."""
  name = getattr(model_config, "name", None)
  if ("params", "backbone", "conv_proj", "kernel") in flat:  # a ViT (models.vit)
    style = getattr(model_config, "vit_style", None) or "torchvision"
    loaded, head = vit_weights.match(state, flat, source, name, style, _to_numpy)
    loaded.update(_head(head, flat, name))
    return loaded
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
      f"[{key_list(unexpected)}], missing variables [{key_list(missing)}]; check model.name"
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
