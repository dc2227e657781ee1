"""ResNet-18 / ResNet-50 exactly as torchvision builds them (v1.5), plus the layers the zoo shares.

Layout is NHWC (torchvision: NCHW). Submodule names mirror torchvision's state-dict keys with a
numeric list index joined by '_' (``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``), so
`divisive_jax.models.torchvision` maps weights one-to-one.

Conventions shared by every backbone of the zoo:
* convolutions have no bias and torchvision's symmetric padding ``k // 2`` (explicit, so stride-2
  layers pad like PyTorch and not like 'SAME');
* BatchNorm: ``y = scale * (x - mean) / sqrt(var + 1e-5) + bias``; running statistics follow
  ``ra = 0.9 * ra + 0.1 * batch_stat`` (torchvision's momentum 0.1); batch statistics are averaged
  over ``bn_axis_name`` when it is set (synchronised BN inside ``jax.shard_map``). Flax keeps the
  biased batch variance in ``var`` where PyTorch keeps the unbiased one (factor n / (n - 1));
  evaluation-mode outputs are identical;
* ``dtype`` is the compute dtype; parameters and running statistics stay float32, except in
  float64 (jax's x64 mode: exact comparisons in tests), where everything is float64;
* on CPU only (`jax.lax.platform_dependent`, decided where the program is lowered; GPU and TPU
  programs keep XLA's convolutions), two kernels XLA:CPU runs slowly are rewritten, with the
  parameters and outputs of the convolution to float rounding (`CpuConv`): 1x1 convolutions as
  2-D matrix products (``dot_1x1``) and, where it pays (`patch_grad_from`), the weight gradient
  of a k x k convolution as one matrix product over image patches (``patch_grad``). Measured in `benchmarks/cpu_kernels.py` (RESULTS.md §2).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

# torchvision ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu'),
# i.e. an untruncated N(0, 2 / (k * k * out_channels)).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STEMS = ("imagenet", "small")


def _dot_1x1(x, kernel, stride: int):
  """``x[:, ::stride, ::stride] @ kernel[0, 0]`` as a 2-D matrix product."""
  x = x[:, ::stride, ::stride, :] if stride > 1 else x
  n, h, w, c = x.shape
  return (x.reshape(n * h * w, c) @ kernel[0, 0]).reshape(n, h, w, kernel.shape[-1])


def _conv(x, kernel, stride: int, pad: int):
  """XLA's NHWC / HWIO convolution, padded by ``pad`` on every side."""
  dims = ("NHWC", "HWIO", "NHWC")
  return lax.conv_general_dilated(
    x, kernel, (stride,) * 2, ((pad, pad),) * 2, dimension_numbers=dims
  )


def patches(x, k: int, stride: int, pad: int):
  """The k x k windows of ``x`` (N, H, W, C) that a convolution of stride ``stride`` padded by
  ``pad`` reads, as (N, H_out, W_out, k * k * C) in the order of an HWIO kernel reshaped to
  (k * k * C, C_out)."""
  with jax.named_scope("patches"):  # profiles class these ops by this name
    return _patches(x, k, stride, pad)


def _patches(x, k: int, stride: int, pad: int):
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  rows, cols = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  windows = [
    xp[:, i : i + rows : stride, j : j + cols : stride] for i in range(k) for j in range(k)
  ]
  return jnp.concatenate(windows, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_patch_grad(x, kernel, stride: int, pad: int):
  return _conv(x, kernel, stride, pad)


def _conv_patch_grad_fwd(x, kernel, stride, pad):
  return _conv(x, kernel, stride, pad), (x, kernel)


def _conv_patch_grad_bwd(stride, pad, residuals, g):
  x, kernel = residuals
  (dx,) = jax.vjp(lambda x: _conv(x, kernel, stride, pad), x)[1](g)  # XLA's input gradient
  k, _, c, d = kernel.shape
  cols = patches(x, k, stride, pad).reshape(-1, k * k * c)
  return dx, (cols.T @ g.reshape(-1, d)).reshape(kernel.shape)


_conv_patch_grad.defvjp(_conv_patch_grad_fwd, _conv_patch_grad_bwd)


def conv_patch_grad(x, kernel, stride: int, pad: int):
  """XLA's convolution, whose weight gradient on CPU is ``patches(x)^T @ g``: one matrix product
  (differentiable again: RRR's double backprop, Grad-CAM++); elsewhere the plain convolution."""
  # The kernel varies over the mesh axes ``x`` varies over (inside `jax.shard_map`), as autodiff
  # makes it implicitly: its gradient is then summed over them, as for the plain convolution.
  varying = jax.typeof(x).manual_axis_type.varying - jax.typeof(kernel).manual_axis_type.varying
  if varying:
    kernel = lax.pcast(kernel, tuple(sorted(varying)), to="varying")
  return lax.platform_dependent(
    x,
    kernel,
    cpu=functools.partial(_conv_patch_grad, stride=stride, pad=pad),
    default=functools.partial(_conv, stride=stride, pad=pad),
  )


class CpuConv(nn.Module):
  """A bias-free k x k convolution of stride ``strides`` padded by ``k // 2`` (parameter ``kernel``
  (k, k, C_in, C_out), initialised as `nn.Conv`'s) in the form XLA:CPU runs fastest; on every
  other platform (`jax.lax.platform_dependent`) XLA's convolution, for cuDNN and the TPU.

  * 1x1: ``x[:, ::s, ::s] @ kernel[0, 0]`` (`_dot_1x1`; padding 0: the rows and columns a
    strided 1x1 convolution reads), a 2-D matrix product ``(N*H*W, C_in) @ (C_in, C_out)``, not
    an einsum over ``nhwc``: XLA:CPU then computes the weight gradient ``x^T g`` from the
    activations as they lie, where the einsum's gradient contracts (n, h, w) in an order that
    makes it transpose both operands first (ResNet-50's train step 1.2x faster; RESULTS.md §2).
    (XLA's GPU compiler of jax 0.10.2 aborts on the strided one's weight gradient, split-K into
    its Triton GEMM: one more reason to keep the convolution there.)
  * k x k: `conv_patch_grad` (the weight gradient as patches^T @ g) when the input (per device)
    has at least ``min_input`` elements, else XLA's convolution alone (`patch_grad_from`)."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = KAIMING_FAN_OUT
  min_input: int = 0

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.strides
    shape = (k, k, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    if k == 1:
      dot, plain = functools.partial(_dot_1x1, stride=s), functools.partial(_conv, stride=s, pad=0)
      return lax.platform_dependent(x, kernel, cpu=dot, default=plain)
    if x.size < self.min_input:
      return _conv(x, kernel, s, k // 2)
    return conv_patch_grad(x, kernel, s, k // 2)


# Inputs (elements per device) from which a 64-255-channel layer's patch gradient pays.
PATCH_GRAD_MIN_INPUT = 3 * 2**20


def patch_grad_from(kernel: int, features: int) -> int | None:
  """The smallest input (elements per device) of a k x k convolution with ``features`` output
  channels whose weight gradient XLA:CPU computes slower than patches^T @ g; None: no input.

  Measured per layer shape (`benchmarks/cpu_kernels.py --layers`, batch 8 and 32, 2-core AMD
  EPYC): always for 256-512 output channels (ResNet stages 3 and 4: 1.0-1.6x) and for ResNet's
  7x7 stem (3.2-3.6x); for 64-128 channels (stages 1 and 2) from about 3M input elements
  (1.9-3.0x at batch 32, where XLA's gradient takes 12x its batch-8 time for 4x the work; 0.8x
  at batch 8); never for narrow layers (32 channels: DenseNet's 3x3s, the tiny model), where
  building the patches costs more than the matrix product saves."""
  if kernel == 1 or features < 64:
    return None
  return 0 if features >= 256 or kernel >= 7 else PATCH_GRAD_MIN_INPUT


def patch_grad_pays(kernel: int, features: int, input_size: int) -> bool:
  """Whether `CpuConv` computes this layer's weight gradient as patches^T @ g on CPU."""
  start = patch_grad_from(kernel, features)
  return start is not None and input_size >= start


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  *,
  name: str,
  dtype: Any = jnp.float32,
  kernel_init: Callable = KAIMING_FAN_OUT,
  dot_1x1: bool = True,
  patch_grad: bool = True,
) -> nn.Module:
  """A bias-free ``kernel`` x ``kernel`` convolution padded by ``kernel // 2`` on every side:
  `CpuConv` for 1x1 (unless ``dot_1x1`` is False) and where `patch_grad_from` gives a size
  (unless ``patch_grad`` is False), else `nn.Conv`."""
  pdtype = param_dtype(dtype)
  start = patch_grad_from(kernel, features) if patch_grad else None
  if (kernel == 1 and dot_1x1) or start is not None:
    return CpuConv(features, kernel, stride, dtype, pdtype, kernel_init, start or 0, name=name)
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=stride,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    param_dtype=pdtype,
    kernel_init=kernel_init,
    name=name,
  )


def batch_norm(train: bool, axis_name: Optional[str], dtype: Any) -> Callable[..., nn.BatchNorm]:
  """A BatchNorm factory with torchvision's hyper-parameters (momentum 0.1, eps 1e-5)."""
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    axis_name=axis_name,
    dtype=dtype,
    param_dtype=param_dtype(dtype),
    force_float32_reductions=dtype != jnp.float64,  # float64: running statistics in float64
  )


def param_dtype(dtype: Any):
  """The dtype of parameters and statistics for compute ``dtype``: float32 (bf16 compute keeps
  float32 parameters), or float64 for float64 compute."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def stem(
  x, kind: str, features: int, *, conv: Callable, norm: Callable, conv_name: str, norm_name: str
):
  """The input layers of a backbone; call it inside a compact method.

  'imagenet': conv 7x7 stride 2 -> BN -> ReLU -> max-pool 3x3 stride 2 (spatial size / 4).
  'small': conv 3x3 stride 1 -> BN -> ReLU, no pooling (28-64 px inputs, as in Viviano et al.).
  """
  if kind not in STEMS:
    raise ValueError(f"Unknown stem {kind!r}; valid stems: {STEMS}")
  if kind == "imagenet":
    x = nn.relu(norm(name=norm_name)(conv(features, 7, 2, name=conv_name)(x)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return nn.relu(norm(name=norm_name)(conv(features, 3, 1, name=conv_name)(x)))


def _shortcut(block: nn.Module, x):
  """Identity, or conv1x1 stride s + BN (torchvision's ``downsample``) when the shape changes."""
  out_channels = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  x = block.conv(out_channels, 1, block.stride, name="downsample_0")(x)
  return block.norm(name="downsample_1")(x)


class BasicBlock(nn.Module):
  """``relu(bn2(conv3x3(relu(bn1(conv3x3_s(x))))) + shortcut(x))``; ``planes`` output channels."""

  planes: int
  stride: int
  conv: Callable
  norm: Callable
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name="bn1")(self.conv(self.planes, 3, self.stride, name="conv1")(x)))
    y = self.norm(name="bn2")(self.conv(self.planes, 3, name="conv2")(y))
    return nn.relu(y + _shortcut(self, x))


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: conv1x1 (planes) -> conv3x3 stride s (planes) -> conv1x1
  (4 * planes), BN after each, ReLU after the first two and after adding the shortcut."""

  planes: int
  stride: int
  conv: Callable
  norm: Callable
  expansion = 4

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name="bn1")(self.conv(self.planes, 1, name="conv1")(x)))
    y = nn.relu(self.norm(name="bn2")(self.conv(self.planes, 3, self.stride, name="conv2")(y)))
    y = self.norm(name="bn3")(self.conv(self.planes * self.expansion, 1, name="conv3")(y))
    return nn.relu(y + _shortcut(self, x))


class ResNet(nn.Module):
  """ResNet backbone: the stem (``width`` channels), then stage i = 0, 1, ... of
  ``stage_sizes[i]`` blocks with ``width * 2**i`` planes and stride 2 in the first block of
  every stage but the first.

  Input: normalised images (N, H, W, C). Output: the last stage's (ReLU'd) feature map, i.e.
  torchvision's ``layer4`` output for ResNet-18/50, with ``width * 2**(stages - 1) * expansion``
  channels (512 for ResNet-18, 2048 for ResNet-50 at width 64).
  """

  stage_sizes: Sequence[int]
  bottleneck: bool = False
  width: int = 64
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  dot_1x1: bool = True  # 1x1 convolutions as dot products (module docstring)
  patch_grad: bool = True  # on CPU, wide k x k weight gradients as a matrix product (docstring)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_fn = functools.partial(
      conv, dtype=self.dtype, dot_1x1=self.dot_1x1, patch_grad=self.patch_grad
    )
    norm_fn = batch_norm(train, self.bn_axis_name, self.dtype)
    x = stem(
      x, self.stem, self.width, conv=conv_fn, norm=norm_fn, conv_name="conv1", norm_name="bn1"
    )
    block = Bottleneck if self.bottleneck else BasicBlock
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block(self.width * 2**i, stride, conv_fn, norm_fn, name=f"layer{i + 1}_{j}")(x)
    return x


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)
