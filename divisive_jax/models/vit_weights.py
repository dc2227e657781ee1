"""ViT weights from files the user has (`models.vit`): torchvision ``vit_b_16``-style and timm
``VisionTransformer`` state dicts (``.pth`` / ``.safetensors``) and big_vision ``.npz``
checkpoints, read without PyTorch by `weights_file.read_state_dict`, mapped to our variables.

The format is told by the keys: torchvision's ``conv_proj.weight``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention.in_proj_*,
self_attention.out_proj, ln_2, mlp.0, mlp.3}``, ``encoder.ln``, ``heads.head``; timm's
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``. Layouts: convolution (D, C, p, p) -> (p, p, C, D),
linear (out, in) -> (in, out), LayerNorm weight -> scale. The fused qkv projection is ours as it
is (q | k | v, heads within each).

big_vision's (``style='big_vision'`` models: tanh GELU; a class token only with ``pool='cls'``,
its ``pool_type='tok'``): ``embedding``, ``cls``, ``pos_embedding`` (no class-token row: ours gets
a zero one; absent for ``posemb='sincos2d'``, whose fixed values ours starts from),
``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query, key, value,
out}, LayerNorm_1, MlpBlock_0/Dense_{0,1}}`` (q, k and v (D, heads, D/heads) concatenated into
the fused projection), ``Transformer/encoder_norm``, ``head``; a ``params/`` prefix, a scanned
encoder (``encoderblock`` with a leading block axis) and vit_jax's old names
(``posembed_input``, ``MlpBlock_3``, ``LayerNorm_2``) are read too.

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

from divisive_jax.models.weights_file import WeightsError, key_list

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


def resample_positions(pos: np.ndarray, grid: tuple[int, int], prefix: int = 1) -> np.ndarray:
  """(1, prefix + g*g, D) position embeddings -> (1, prefix + h*w, D) for the patch ``grid``
  (h, w): the ``prefix`` rows (the class token's) kept, the g x g grid resampled bicubically
  (`_bicubic_matrix`)."""
  _, length, d = pos.shape
  g = int(round((length - prefix) ** 0.5))
  if g * g != length - prefix:
    raise ValueError(f"position embeddings of {length - prefix} patches are not a square grid")
  old = pos[0, prefix:].reshape(g, g, d).astype(np.float64)
  mh, mw = _bicubic_matrix(g, grid[0]), _bicubic_matrix(g, grid[1])
  new = np.einsum("hi,ijd,wj->hwd", mh, old, mw).reshape(1, -1, d)
  return np.concatenate([pos[:, :prefix], new.astype(pos.dtype)], axis=1)


def _layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


_SIZE_FIX = (
  "Fix: --config.model.name= the ViT of that size (vit_ti16: 192, vit_s16: 384, vit_b16: 768; "
  "12 blocks)"
)
_FOREIGN = "Fix: a plain ViT checkpoint (no fc_norm, register tokens, layer scale, MAP head or pre-logits layer)"


def match(state: Mapping[str, Any], flat: dict, source: str, name: str, style: str, to_numpy):
  """(our flat key -> array, the classifier {'weight', 'bias'} in torch's layout) for a ViT
  state dict of torchvision, timm or big_vision (module docstring); raises `WeightsError`."""
  bb = ("params", "backbone")
  depth = len({k[2] for k in flat if k[2].startswith("encoder_layer_")})
  width = flat[(*bb, "conv_proj", "bias")].shape[-1]
  big = _big_vision_keys(state)
  kind = "big_vision" if big else "timm" if "cls_token" in state else "torchvision"
  if (kind == "big_vision") != (style == "big_vision"):
    raise WeightsError(
      f"{source}: a {kind} ViT checkpoint; the model is built as {style}'s. Fix: "
      f"--config.model.vit_style={'big_vision' if big else 'torchvision'}"
    )
  if big:
    arrays, head, blocks = _from_big_vision(big, flat, source, to_numpy)
  else:
    if "class_token" not in state and "cls_token" not in state:
      raise WeightsError(
        f"{source} is not a ViT state dict of torchvision (class_token), timm (cls_token) or "
        f"big_vision (Transformer/...); check model.name (now {name!r})"
      )
    arrays, head, blocks = _from_torch(state, flat, source, depth, int(kind == "timm"), to_numpy)
  conv = arrays.get((*bb, "conv_proj", "bias"))  # a missing one is named below
  file_width = conv[1].shape[-1] if conv else width
  if blocks != depth or file_width != width:
    raise WeightsError(
      f"{source}: a {kind} ViT of width {file_width} and {blocks} blocks; {name} has width "
      f"{width} and {depth} blocks. {_SIZE_FIX}"
    )
  loaded = {}
  for target in flat:
    if target[:2] != bb:
      continue
    if target not in arrays:
      raise WeightsError(
        f"{source}: nothing for our {'/'.join(target[1:])} in this {kind} ViT; check model.name ({name!r})"
      )
    their, array = arrays.pop(target)
    want = tuple(flat[target].shape)
    if target[-1] == "pos_embedding" and array.shape != want:
      array = resample_positions(
        array, _grid(want, (*bb, "class_token") in flat), int((*bb, "class_token") in flat)
      )
    if array.shape != want:
      hint = (
        f"--config.model.patch_size={array.shape[0]}"
        if target[-2:] == ("conv_proj", "kernel")
        else f"check model.name ({name!r})"
      )
      raise WeightsError(
        f"{source}: {their} (converted {array.shape}) does not fit our {'/'.join(target[1:])} "
        f"of shape {want}. Fix: {hint}"
      )
    loaded[target] = array
  return loaded, head


def _refuse_foreign(source: str, extra) -> None:
  """Stop at keys of parts our ViT does not build (fc_norm, pre-logits, a MAP head, ...)."""
  if extra:
    raise WeightsError(
      f"{source}: keys of parts our ViT does not build: {key_list(extra, 6)}. {_FOREIGN}"
    )


def _from_torch(state, flat, source: str, depth: int, timm: int, to_numpy):
  """torchvision's (timm=0) or timm's (1) names -> ({our key: (their key, array)}, head,
  their block count)."""
  keys = set(state)
  blocks = {
    int(m.group(1))
    for k in keys
    if (m := re.match(r"^(?:blocks\.|encoder\.layers\.encoder_layer_)(\d+)\.", k))
  }
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
  _refuse_foreign(source, keys - set(names) - set(head))
  arrays = {t: (k, _layout(to_numpy(state[k]), t[-1])) for k, t in names.items() if k in keys}
  return arrays, {k.split(".")[-1]: v for k, v in head.items()}, len(blocks)


def _big_vision_keys(state) -> dict:
  """A big_vision checkpoint's arrays by today's names ('' when it is not one): the 'params/'
  prefix dropped, vit_jax's old names renamed as big_vision's ``fix_old_checkpoints`` does, and
  a scanned encoder ('encoderblock', one leading axis) split into 'encoderblock_{i}'."""
  keys = {k.removeprefix("params/"): k for k in state}
  if not any(k.startswith("Transformer/") for k in keys):
    return {}
  out = {}
  for k, original in keys.items():
    k = k.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
    k = re.sub(r"(encoderblock[^/]*)/MlpBlock_3/", r"\1/MlpBlock_0/", k)
    k = re.sub(r"(encoderblock[^/]*)/LayerNorm_2/", r"\1/LayerNorm_1/", k)
    if k.startswith("Transformer/encoderblock/"):  # scanned: leading axis = block
      stacked = np.asarray(state[original])
      for i in range(stacked.shape[0]):
        out[k.replace("encoderblock/", f"encoderblock_{i}/")] = stacked[i]
    else:
      out[k] = state[original]
  return out


_BV_BLOCK = {  # ours <- big_vision's, below 'encoder_layer_{i}' / 'Transformer/encoderblock_{i}'
  "ln_1": "LayerNorm_0",
  "ln_2": "LayerNorm_1",
  "mlp_0": "MlpBlock_0/Dense_0",
  "mlp_3": "MlpBlock_0/Dense_1",
  "self_attention/out_proj": "MultiHeadDotProductAttention_0/out",
}


def _from_big_vision(state, flat, source: str, to_numpy):
  """big_vision's names -> ({our key: (their key, array)}, head, block count)."""
  get = lambda k: to_numpy(state[k])
  arrays = {}
  bb = ("params", "backbone")
  for leaf in ("kernel", "bias"):
    if (key := f"embedding/{leaf}") in state:
      arrays[(*bb, "conv_proj", leaf)] = (key, get(key))
  has_cls = (*bb, "class_token") in flat
  if ("cls" in state) != has_cls:
    fix = "--config.model.pool=cls" if "cls" in state else "--config.model.pool=gap"
    raise WeightsError(
      f"{source}: a big_vision ViT {'with' if 'cls' in state else 'without'} a class token "
      f"(pool_type {'tok' if 'cls' in state else 'gap'}); ours is the other. Fix: {fix}"
    )
  if has_cls:
    arrays[(*bb, "class_token")] = ("cls", get("cls"))
  if "pos_embedding" in state:
    pos = get("pos_embedding")
  else:  # posemb 'sincos2d': no parameter; ours starts from the same values
    side = int(round((flat[(*bb, "encoder", "pos_embedding")].shape[1] - has_cls) ** 0.5))
    pos = posemb_sincos_2d(side, side, flat[(*bb, "conv_proj", "bias")].shape[-1])
  if has_cls:  # big_vision adds no position to its class token: ours, with a zero row
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  arrays[(*bb, "encoder", "pos_embedding")] = ("pos_embedding", pos)
  blocks = {
    int(m.group(1)) for k in state if (m := re.match(r"^Transformer/encoderblock_(\d+)/", k))
  }
  used = {"cls", "pos_embedding", "embedding/kernel", "embedding/bias"}
  for i in sorted(blocks):
    prefix, ours = f"Transformer/encoderblock_{i}/", (*bb, f"encoder_layer_{i}")
    for mine, theirs in _BV_BLOCK.items():
      for leaf in ("scale", "kernel", "bias"):
        if (key := f"{prefix}{theirs}/{leaf}") in state:
          array = get(key)
          if mine == "self_attention/out_proj" and leaf == "kernel":  # (H, hd, D) -> (D, D)
            array = array.reshape(-1, array.shape[-1])
          arrays[(*ours, *mine.split("/"), leaf)] = (key, array)
          used.add(key)
    attention = f"{prefix}MultiHeadDotProductAttention_0/"
    for leaf in ("kernel", "bias"):  # q, k, v (D, H, hd) / (H, hd) -> in_proj (D, 3D) / (3D,)
      keys = [f"{attention}{part}/{leaf}" for part in ("query", "key", "value")]
      if all(k in state for k in keys):
        parts = [get(k) for k in keys]
        parts = [x.reshape(x.shape[0], -1) if leaf == "kernel" else x.reshape(-1) for x in parts]
        arrays[(*ours, "self_attention", "in_proj", leaf)] = (keys[0], np.concatenate(parts, -1))
        used.update(keys)
  for leaf in ("scale", "bias"):
    if (key := f"Transformer/encoder_norm/{leaf}") in state:
      arrays[(*bb, "ln", leaf)] = (key, get(key))
      used.add(key)
  head = {}
  if "head/kernel" in state:
    head = {"weight": get("head/kernel").T, "bias": get("head/bias")}
    used.update({"head/kernel", "head/bias"})
  _refuse_foreign(source, set(state) - used)
  return arrays, head, len(blocks)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """big_vision's fixed 2-D sine-cosine position embeddings (1, h*w, width) (MoCo v3)."""
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
  y, x = np.outer(y.flatten(), omega), np.outer(x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(
    np.float32
  )


def _leaves(their: str, ours: tuple, flat: dict) -> dict:
  """{their key: our flat key} for a module (weight/bias) or a bare parameter."""
  if ours in flat:  # class_token, pos_embedding
    return {their: ours}
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  if their.endswith("self_attention.in_proj"):  # torch's MultiheadAttention: in_proj_weight
    return {f"{their}_{leaf[k[-1]]}": k for k in flat if k[:-1] == ours}
  return {f"{their}.{leaf[k[-1]]}": k for k in flat if k[:-1] == ours}


def _grid(shape: tuple, class_token: bool) -> tuple[int, int]:
  """Our patch grid (h, w) from our position embeddings' shape (square grids)."""
  side = int(round((shape[1] - class_token) ** 0.5))
  return side, side
