"""DenseNet-121 exactly as torchvision builds it (Huang et al.), NHWC.

Submodule names mirror torchvision's state-dict keys without the ``features.`` prefix
(``features.denseblock1.denselayer1.norm1`` -> ``denseblock1/denselayer1/norm1``).

torchvision's DenseNet-121: 64 initial features, growth rate k = 32, blocks (6, 12, 24, 16),
bottleneck width ``bn_size * k`` with bn_size = 4. Here ``width`` is the number of initial
features and the growth rate is ``width // 2``, so width 64 is torchvision's network and a small
width gives a narrow one with the same topology. Convolutions use torchvision's DenseNet init,
``kaiming_normal_`` with its defaults (mode 'fan_in'): N(0, 2 / (k * k * in_channels)).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from divisive_jax.models.resnet import batch_norm, conv, stem

KAIMING_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class DenseLayer(nn.Module):
  """``conv3x3(relu(norm2(conv1x1(relu(norm1(x))))))`` with ``bn_size * growth`` then
  ``growth`` channels; the caller concatenates the output to its input."""

  growth: int
  bn_size: int
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name="norm1")(x))
    y = self.conv(self.bn_size * self.growth, 1, name="conv1")(y)
    return self.conv(self.growth, 3, name="conv2")(nn.relu(self.norm(name="norm2")(y)))


class DenseBlock(nn.Module):
  """``num_layers`` dense layers; layer l sees ``concat(x, y_1, ..., y_{l-1})`` (channels last)
  and the block returns ``concat(x, y_1, ..., y_L)``, torchvision's order."""

  num_layers: int
  growth: int
  bn_size: int
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x):
    for l in range(self.num_layers):
      y = DenseLayer(self.growth, self.bn_size, self.conv, self.norm, name=f"denselayer{l + 1}")(x)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """``avg_pool2x2(conv1x1(relu(norm(x))))`` halving channels (floor) and spatial size (floor)."""

  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x):
    x = self.conv(x.shape[-1] // 2, 1, name="conv")(nn.relu(self.norm(name="norm")(x)))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet backbone. Input: normalised images (N, H, W, C). Output:
  ``relu(norm5(features(x)))``, the map torchvision pools before its classifier
  (1024 channels for DenseNet-121 at width 64)."""

  block_config: Sequence[int]
  width: int = 64
  bn_size: int = 4
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  dot_1x1: bool = True  # 1x1 convolutions as dot products (`resnet` module docstring)
  patch_grad: bool = True  # on CPU, the stem's weight gradient as a matrix product (idem)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_fn = functools.partial(
      conv,
      dtype=self.dtype,
      kernel_init=KAIMING_FAN_IN,
      dot_1x1=self.dot_1x1,
      patch_grad=self.patch_grad,
    )
    norm_fn = batch_norm(train, self.bn_axis_name, self.dtype)
    x = stem(
      x, self.stem, self.width, conv=conv_fn, norm=norm_fn, conv_name="conv0", norm_name="norm0"
    )
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(
        num_layers, self.width // 2, self.bn_size, conv_fn, norm_fn, name=f"denseblock{i + 1}"
      )(x)
      if i + 1 < len(self.block_config):
        x = Transition(conv_fn, norm_fn, name=f"transition{i + 1}")(x)
    return nn.relu(norm_fn(name="norm5")(x))


densenet121 = functools.partial(DenseNet, block_config=(6, 12, 24, 16))
