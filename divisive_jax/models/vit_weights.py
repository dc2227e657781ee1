"""ViT weights from files the user has (`models.vit`): torchvision ``vit_b_16``-style and timm
``VisionTransformer`` state dicts (``.pth`` / ``.safetensors``, read without PyTorch by
`weights_file.read_state_dict`), mapped to our variables.

The format is told by the keys: torchvision's ``conv_proj.weight``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention.in_proj_*,
self_attention.out_proj, ln_2, mlp.0, mlp.3}``, ``encoder.ln``, ``heads.head``; timm's
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``. Layouts: convolution (D, C, p, p) -> (p, p, C, D),
linear (out, in) -> (in, out), LayerNorm weight -> scale. The fused qkv projection is ours as it
is (q | k | v, heads within each).

The position embeddings of a checkpoint made at another image size are resampled to ours as
torchvision's ``interpolate_embeddings`` does (the class token's kept; the grid bicubic, a = -0.75,
corners aligned), so a 224 px checkpoint fine-tunes at 64 px. The classifier is loaded when its
shape is ours (else ours is kept, as for the CNNs). A checkpoint of another width, depth or patch
size, or with parts we do not build (timm's ``fc_norm``, register tokens, layer scale, a
torchvision ``pre_logits`` layer), is refused with one line naming the file and the fix.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from divisive_jax.models.weights_file import WeightsError

# Our module below 'backbone/encoder_layer_{i}' <- (torchvision name, timm name).
_BLOCK = {
  "ln_1": ("ln_1", "norm1"),
  "self_attention/in_proj": ("self_attention.in_proj", "attn.qkv"),
  "self_attention/out_proj": ("self_attention.out_proj", "attn.proj"),
  "ln_2": ("ln_2", "norm2"),
  "mlp_0": ("mlp.0", "mlp.fc1"),
  "mlp_3": ("mlp.3", "mlp.fc2"),
}
_TOP = {  # ours <- (torchvision, timm)
  "conv_proj": ("conv_proj", "patch_embed.proj"),
  "class_token": ("class_token", "cls_token"),
  "encoder/pos_embedding": ("encoder.pos_embedding", "pos_embed"),
  "ln": ("encoder.ln", "norm"),
}
_HEAD = ("heads.head", "head")
_BLOCK_PREFIX = ("encoder.layers.encoder_layer_{}.", "blocks.{}.")


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution kernel (Keys, a = -0.75) at distances ``x``."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(old: int, new: int) -> np.ndarray:
  """(new, old): torch's ``interpolate(mode='bicubic', align_corners=True)`` along one axis
  (source positions i (old - 1) / (new - 1), borders clamped)."""
  src = np.arange(new) * ((old - 1) / (new - 1) if new > 1 else 0.0)
  base = np.floor(src).astype(int)
  out = np.zeros((new, old))
  for k in range(-1, 3):
    idx = np.clip(base + k, 0, old - 1)
    np.add.at(out, (np.arange(new), idx), _cubic(src - (base + k)))
  return out


def resample_positions(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(1, 1 + g*g, D) position embeddings -> (1, 1 + h*w, D) for the patch ``grid`` (h, w): the
  class token's kept, the g x g grid resampled bicubically (`_bicubic_matrix`)."""
  _, length, d = pos.shape
  g = int(round((length - 1) ** 0.5))
  if g * g != length - 1:
    raise ValueError(f"position embeddings of {length - 1} patches are not a square grid")
  old = pos[0, 1:].reshape(g, g, d).astype(np.float64)
  mh, mw = _bicubic_matrix(g, grid[0]), _bicubic_matrix(g, grid[1])
  new = np.einsum("hi,ijd,wj->hwd", mh, old, mw).reshape(1, -1, d)
  return np.concatenate([pos[:, :1], new.astype(pos.dtype)], axis=1)


def _layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def match(state: Mapping[str, Any], flat: dict, source: str, name: str, to_numpy) -> dict:
  """Our flat key -> array for a ViT state dict (module docstring); raises `WeightsError`."""
  keys = set(state)
  timm = int("cls_token" in keys)  # 0: torchvision's names, 1: timm's
  if not timm and "class_token" not in keys:
    raise WeightsError(
      f"{source} is not a ViT state dict of torchvision (class_token) or timm (cls_token); "
      f"check model.name (now {name!r})"
    )
  kind = ("torchvision", "timm")[timm]
  depth = len({k[2] for k in flat if k[2].startswith("encoder_layer_")})
  theirs = {
    int(m.group(1))
    for k in keys
    if (m := re.match(r"^(?:blocks\.|encoder\.layers\.encoder_layer_)(\d+)\.", k))
  }
  width = flat[("params", "backbone", "class_token")].shape[-1]
  file_width = np.shape(state[_TOP["class_token"][timm]])[-1]
  if len(theirs) != depth or file_width != width:
    raise WeightsError(
      f"{source}: a {kind} ViT of width {file_width} and {len(theirs)} blocks; {name} has width "
      f"{width} and {depth} blocks. Fix: --config.model.name= the ViT of that size (vit_ti16: "
      "192, vit_s16: 384, vit_b16: 768; 12 blocks)"
    )
  names = {}  # their key -> our flat key
  for ours, pair in _TOP.items():
    names.update(_leaves(pair[timm], ("params", "backbone", *ours.split("/")), flat))
  for i in range(depth):
    for ours, pair in _BLOCK.items():
      their = _BLOCK_PREFIX[timm].format(i) + pair[timm]
      names.update(
        _leaves(their, ("params", "backbone", f"encoder_layer_{i}", *ours.split("/")), flat)
      )
  head = {k: to_numpy(state[k]) for k in keys if k.startswith(_HEAD[timm] + ".")}
  if extra := sorted(keys - set(names) - set(head)):
    raise WeightsError(
      f"{source}: keys of parts our ViT does not build: {', '.join(extra[:6])}"
      f"{' ...' if len(extra) > 6 else ''}. Fix: a plain ViT checkpoint (class-token pool; no "
      "fc_norm, register tokens, layer scale or pre-logits layer)"
    )
  loaded = {}
  for their, target in names.items():
    if their not in keys:
      raise WeightsError(
        f"{source}: no {their} in this {kind} ViT state dict; check model.name ({name!r})"
      )
    array = _layout(to_numpy(state[their]), target[-1])
    want = tuple(flat[target].shape)
    if target[-1] == "pos_embedding" and array.shape != want:
      grid = _grid(flat)
      array = resample_positions(array, grid)
    if array.shape != want:
      hint = (
        f"--config.model.patch_size={array.shape[0]}"
        if target[-2:] == ("conv_proj", "kernel")
        else f"check model.name ({name!r})"
      )
      raise WeightsError(
        f"{source}: {their} of shape {tuple(np.shape(state[their]))} (converted {array.shape}) "
        f"does not fit our {'/'.join(target[1:])} of shape {want}. Fix: {hint}"
      )
    loaded[target] = array
  return loaded, {k.split(".")[-1]: v for k, v in head.items()}


def _leaves(their: str, ours: tuple, flat: dict) -> dict:
  """{their key: our flat key} for a module (weight/bias) or a bare parameter."""
  if ours in flat:  # class_token, pos_embedding
    return {their: ours}
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  if their.endswith("self_attention.in_proj"):  # torch's MultiheadAttention: in_proj_weight
    return {f"{their}_{leaf[k[-1]]}": k for k in flat if k[:-1] == ours}
  return {f"{their}.{leaf[k[-1]]}": k for k in flat if k[:-1] == ours}


def _grid(flat: dict) -> tuple[int, int]:
  """Our patch grid (h, w): the position embeddings' length (square grids)."""
  length = flat[("params", "backbone", "encoder", "pos_embedding")].shape[1] - 1
  side = int(round(length**0.5))
  return side, side
