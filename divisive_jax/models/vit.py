"""Vision Transformers (Dosovitskiy et al., ICLR 2021) as backbones of the zoo, with class
activation maps on the patch grid.

The encoder is torchvision's ``VisionTransformer`` (and timm's ``VisionTransformer``): a p x p
stride-p convolution to D channels, a learned class token prepended, learned position
embeddings added, L pre-norm blocks ``x += attn(ln_1(x)); x += mlp(ln_2(x))`` (exact GELU,
LayerNorm eps 1e-6, fused qkv projection), a final LayerNorm. Submodule names follow
torchvision's state-dict keys joined by '_' (``encoder.layers.encoder_layer_3.mlp.0`` ->
``encoder_layer_3/mlp_0``); the attention's ``in_proj`` is the fused (D, 3D) qkv Dense.

What the zoo's contract (`divisive_jax.models`) sees, by ``pool``:

* ``'gap'``: ``A`` = the final LayerNorm's patch tokens on the (H/p, W/p) grid; the classifier
  head is global average pooling + Dense, so ``CAM_c = sum_k W[k, c] A_k`` is exact, as for the
  CNNs. (The class token is in the sequence, as in timm's ``global_pool='avg'`` models, so that
  torchvision and timm checkpoints load; it is not part of ``A``.)
* ``'cls'`` (torchvision's and most checkpoints' head): ``A`` = the patch tokens ENTERING the last
  block; ``features`` returns ``(A, cls)`` with ``cls`` the class token entering it (N, 1, D), and
  the classifier head runs the last block, the final LayerNorm and the Dense on the class token
  (`ViT.pool`). Both class maps still come from one vjp of that head at ``A`` (the class token
  held at its value), as Grad-CAM (Selvaraju et al.) and pytorch-grad-cam's ViT recipe define
  them; the ``'cam'`` kind, which needs a linear head, is refused (`check`).

``style='big_vision'`` is big_vision's ViT (its checkpoints, `vit_weights`): the tanh-approximate
GELU (flax's default), and with ``pool='gap'`` no class token at all (its ``pool_type='gap'``);
with ``pool='cls'`` its class token takes no position embedding, which is ours with that
embedding's first row 0 (how `vit_weights` loads it).

There is no BatchNorm: the ViTs have no ``batch_stats``. ``dtype`` is the compute dtype (bf16 on
accelerators); parameters, LayerNorm statistics and the attention softmax stay float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from divisive_jax.models.resnet import param_dtype

# name: (patch size, width D, depth L, heads, MLP width); the standard ViT-Ti/S/B at patch 16
# (Touvron et al. 2021; Dosovitskiy et al. 2021), and a tiny one for tests and the CPU demo.
SIZES = {
  "vit_tiny": (8, 64, 4, 4, 128),
  "vit_ti16": (16, 192, 12, 3, 768),
  "vit_s16": (16, 384, 12, 6, 1536),
  "vit_b16": (16, 768, 12, 12, 3072),
}
POOLS = ("gap", "cls")
STYLES = ("torchvision", "big_vision")
LN_EPS = 1e-6
DENSE_INIT = nn.initializers.xavier_uniform()  # torchvision's init of the encoder's Linears


class Attention(nn.Module):
  """Multi-head self-attention: ``in_proj`` (D -> 3D, q|k|v), softmax(q k^T / sqrt(D/heads)) v
  (the softmax in float32, or float64 in x64 tests), ``out_proj`` (D -> D)."""

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    dense = functools.partial(
      nn.Dense, dtype=self.dtype, param_dtype=param_dtype(self.dtype), kernel_init=DENSE_INIT
    )
    q, k, v = jnp.split(dense(3 * d, name="in_proj")(x).reshape(n, t, 3, self.heads, -1), 3, 2)
    q, k, v = (y[:, :, 0] for y in (q, k, v))  # (N, T, heads, D / heads)
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = jax.nn.softmax(logits.astype(param_dtype(self.dtype)), -1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, t, d)
    return dense(d, name="out_proj")(out)


class EncoderBlock(nn.Module):
  """A pre-norm transformer block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))``."""

  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu_tanh: bool = False  # big_vision's GELU (flax's default tanh approximation)

  @nn.compact
  def __call__(self, x):
    pdt = param_dtype(self.dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype, param_dtype=pdt)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=pdt, kernel_init=DENSE_INIT)
    x = x + Attention(self.heads, self.dtype, name="self_attention")(norm(name="ln_1")(x))
    y = nn.gelu(dense(self.mlp_dim, name="mlp_0")(norm(name="ln_2")(x)), self.gelu_tanh)
    return x + dense(x.shape[-1], name="mlp_3")(y)


class PositionEmbedding(nn.Module):
  """Adds the learned ``pos_embedding`` (1, T, D), its length T taken from the first input."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(stddev=0.02)
    pos = self.param("pos_embedding", init, (1,) + x.shape[1:], param_dtype(x.dtype))
    return x + pos.astype(x.dtype)


class ViT(nn.Module):
  """A ViT backbone (module docstring). Input: normalised images (N, H, W, C), H and W multiples
  of ``patch_size``. Output: ``A`` (N, H/p, W/p, D) for ``pool='gap'``; ``(A, cls)`` for
  ``pool='cls'``."""

  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  pool: str = "gap"
  dtype: Any = jnp.float32
  style: str = "torchvision"  # STYLES

  def setup(self):
    pdt = param_dtype(self.dtype)
    p = self.patch_size
    self.conv_proj = nn.Conv(
      self.width, (p, p), (p, p), "VALID", dtype=self.dtype, param_dtype=pdt, name="conv_proj"
    )
    if self.has_class_token:
      zeros = nn.initializers.zeros
      self.class_token = self.param("class_token", zeros, (1, 1, self.width), pdt)
    self.position = PositionEmbedding(name="encoder")
    tanh = self.style == "big_vision"
    block = functools.partial(EncoderBlock, self.heads, self.mlp_dim, self.dtype, tanh)
    self.layers = [block(name=f"encoder_layer_{i}") for i in range(self.depth)]
    self.ln = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=pdt, name="ln")

  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm, no dropout
    n, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"ViT patch size {p} does not divide the input size {h}x{w}")
    tokens = self.conv_proj(x).reshape(n, (h // p) * (w // p), self.width)
    if self.has_class_token:
      cls = jnp.broadcast_to(self.class_token.astype(tokens.dtype), (n, 1, self.width))
      tokens = jnp.concatenate([cls, tokens], axis=1)
    tokens = self.position(tokens)
    for block in self.layers[:-1]:
      tokens = block(tokens)
    first = int(self.has_class_token)
    grid = lambda t: t[:, first:].reshape(n, h // p, w // p, self.width)
    if self.pool == "cls":
      return grid(tokens), tokens[:, :1]
    return grid(self.ln(self.layers[-1](tokens)))

  @property
  def has_class_token(self) -> bool:
    """torchvision's and timm's ViTs always have one; big_vision's only with the class-token
    head (its ``pool_type='tok'``)."""
    return self.style == "torchvision" or self.pool == "cls"

  def pool_tokens(self, features):
    """The class-token head's input: ``(A, cls)`` -> the final LayerNorm of the last block's
    class token (N, D), for ``pool='cls'``."""
    a, cls = features
    n, h, w, d = a.shape
    tokens = jnp.concatenate([cls.astype(self.dtype), a.astype(self.dtype).reshape(n, h * w, d)], 1)
    return self.ln(self.layers[-1](tokens))[:, 0]


def vit_backbone(
  name: str, pool: str = "gap", patch_size: int = 0, dtype: Any = jnp.float32, style: str = ""
) -> ViT:
  """The ViT of ``SIZES[name]``; ``patch_size`` 0 keeps the size's own, ``style`` '' is
  torchvision's."""
  if pool not in POOLS or (style or STYLES[0]) not in STYLES:
    raise ValueError(f"Unknown ViT pool {pool!r} or style {style!r}: valid {POOLS}, {STYLES}")
  own, width, depth, heads, mlp_dim = SIZES[name]
  return ViT(patch_size or own, width, depth, heads, mlp_dim, pool, dtype, style or STYLES[0])
