"""The model zoo: `get_model(config.model)` -> a classifier with `features` and `head` methods.

    A = model.apply(variables, x, train=False, method="features")   # (N, h, w, C) float32
    logits = model.apply({"params": params}, A, method="head")      # (N, num_outputs) float32
    logits = model.apply(variables, x, train=False)                 # = head(features(x))

``A`` is the last feature map before global average pooling, exactly as torchvision computes it
(ResNet: ``layer4`` output; DenseNet: ``relu(norm5(features))``; a ``pool='gap'`` ViT: the final
LayerNorm's patch tokens on the patch grid), so a class activation map is
``CAM_c = sum_k W[k, c] * A[..., k]`` with ``W = params["head"]["kernel"]`` of shape (C, K).
A ``pool='cls'`` ViT's features are ``(A, cls)``, A the patch tokens entering its last block, and
its head runs that block's class-token path (`vit`); `grid` gives ``A`` of either.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from divisive_jax.errors import ConfigError
from divisive_jax.models.densenet import densenet121
from divisive_jax.models.resnet import STEMS, param_dtype, resnet18, resnet50
from divisive_jax.models.tiny import tiny
from divisive_jax.models.vit import POOLS, SIZES, STYLES, vit_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)

CNNS = {"resnet18": resnet18, "resnet50": resnet50, "densenet121": densenet121, "tiny": tiny}
BACKBONES = {**CNNS, **{name: functools.partial(vit_backbone, name) for name in SIZES}}
# float64 needs jax's x64 mode (JAX_ENABLE_X64=1): for exact comparisons (tests), not training.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class Classifier(nn.Module):
  """``logits = head(features(x))`` with ``features = backbone((x - mean) / std)`` and
  ``head(A) = mean_{h,w}(A) @ W + b`` (global average pooling, then a Dense named 'head').

  ``input_mean``/``input_std`` are per-channel tuples broadcast over the last axis; when None
  they default to ImageNet's statistics for 3-channel inputs and to 0.5 / 0.5 otherwise. The
  backbone computes in its own dtype; ``A`` and the logits are float32 (float64 for a float64
  backbone). The head keeps Flax's
  default init (LeCun-normal kernel, zero bias) so that class activation maps are non-zero from
  the first step.
  """

  backbone: nn.Module
  num_outputs: int = 2
  input_mean: Optional[Sequence[float]] = None
  input_std: Optional[Sequence[float]] = None

  def features(self, x, train: bool = False):
    """(N, H, W, C) images -> A, (N, h, w, C') float32; updates BN statistics when train."""
    dtype = param_dtype(self.backbone.dtype)
    x = jnp.asarray(x, dtype)
    rgb = x.shape[-1] == 3
    mean = self.input_mean or (IMAGENET_MEAN if rgb else GRAY_MEAN)
    std = self.input_std or (IMAGENET_STD if rgb else GRAY_STD)
    x = (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)
    return jax.tree.map(lambda a: a.astype(dtype), self.backbone(x, train=train))

  @nn.compact
  def head(self, A):
    """A (N, h, w, C) -> logits (N, num_outputs), float32; params at ``params['head']``. A
    class-token ViT's ``(A, cls)`` pass its last block first (`vit.ViT.pool_tokens`)."""
    dtype = param_dtype(self.backbone.dtype)
    dense = nn.Dense(self.num_outputs, dtype=dtype, param_dtype=dtype, name="head")
    pooled = self.backbone.pool_tokens(A) if isinstance(A, tuple) else A.mean(axis=(1, 2))
    return dense(pooled.astype(dtype))

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train=train))


def get_model(model_config: Any, bn_axis_name: Optional[str] = None) -> Classifier:
  """Builds the classifier described by ``model_config`` (any object with attribute access).

  Fields (missing or None -> default): ``name`` (required; one of `BACKBONES`),
  ``num_outputs`` (2; 1 = single-logit binary head), ``stem`` ('imagenet' | 'small'),
  ``width`` (base channel count: 64 for the torchvision models, 16 for tiny), ``dtype``
  ('float32' | 'bfloat16', compute dtype; params stay float32; 'float64' in x64 mode),
  ``input_mean``/``input_std``.
  ``bn_axis_name``: mesh axis over which BatchNorm averages batch statistics (e.g. 'data' when
  the step runs inside ``jax.shard_map``); None for unsharded use.
  """

  def field(name, default=None):
    value = getattr(model_config, name, None)
    return default if value is None else value

  name, dtype = field("name"), field("dtype", "float32")
  if name not in BACKBONES:
    raise ValueError(f"Unknown model name {name!r}; valid names: {sorted(BACKBONES)}")
  if dtype not in DTYPES:
    raise ValueError(f"Unknown model dtype {dtype!r}; valid dtypes: {sorted(DTYPES)}")
  if name in SIZES:
    pool, patch, style = field("pool", "gap"), int(field("patch_size", 0)), field("vit_style", "")
    backbone = vit_backbone(name, pool, patch, DTYPES[dtype], style)
  else:
    stem, width = field("stem", "imagenet"), field("width")
    if stem not in STEMS:
      raise ValueError(f"Unknown model stem {stem!r}; valid stems: {STEMS}")
    backbone = CNNS[name](
      stem=stem,
      dtype=DTYPES[dtype],
      bn_axis_name=bn_axis_name,
      **({} if width is None else {"width": int(width)}),
    )
  mean, std = field("input_mean"), field("input_std")
  return Classifier(
    backbone,
    num_outputs=int(field("num_outputs", 2)),
    input_mean=None if mean is None else tuple(map(float, mean)),
    input_std=None if std is None else tuple(map(float, std)),
  )


def check(config) -> None:
  """The model settings that depend on each other or on the platform (`config_base.validate`
  checks each field's own values): float64, a ViT's pool, patch size and CAM kind, and no ViT
  settings on a CNN."""
  m = config.model
  if m.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ConfigError(
      "config.model.dtype='float64' needs jax's 64-bit mode: set JAX_ENABLE_X64=1 (it is meant "
      "for exact comparisons; train in float32 or bfloat16)"
    )
  if m.name not in SIZES:
    if m.pool != "gap" or m.patch_size or m.vit_style != STYLES[0]:
      raise ConfigError(
        f"config.model.pool / patch_size / vit_style are ViT settings; {m.name} is a CNN. Fix: "
        f"drop them or use a ViT ({', '.join(SIZES)})"
      )
    return
  for field, valid in (("pool", POOLS), ("vit_style", STYLES)):
    if m[field] not in valid:
      raise ConfigError(
        f"config.model.{field}={m[field]!r} is not valid; valid: {', '.join(valid)}"
      )
  if m.stem != "imagenet" or m.width != 64:
    raise ConfigError(
      f"config.model.stem={m.stem!r} / width={m.width} are CNN settings; a ViT's size is its "
      f"name ({m.name}). Fix: leave them at 'imagenet' / 64 (the {m.name} variant does)"
    )
  patch = int(m.patch_size) or SIZES[m.name][0]
  if int(m.patch_size) < 0 or config.data.image_size % patch:
    raise ConfigError(
      f"config.data.image_size={config.data.image_size} is not a multiple of the ViT patch "
      f"size {patch} (config.model.patch_size={m.patch_size}; 0: {m.name}'s own). Fix: an image "
      f"size of {max(patch, config.data.image_size // patch * patch)} or another patch size"
    )
  if m.pool == "cls" and config.loss.cam_kind == "cam":
    raise ConfigError(
      "config.loss.cam_kind='cam' needs a linear head (CAM = W^T A); a pool='cls' ViT's head is "
      "its last block. Fix: --config.loss.cam_kind=gradcam (or gradcampp), or "
      "--config.model.pool=gap"
    )


def grid(features):
  """``A`` (N, h, w, C) of a model's features: themselves, or the first of a ViT's ``(A, cls)``."""
  return features[0] if isinstance(features, tuple) else features
