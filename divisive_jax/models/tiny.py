"""A small ResNet for fast CPU experiments and tests (28-64 px inputs).

Three stages of one BasicBlock each, widths (w, 2w, 4w), strides (1, 2, 2); w = ``width``
(16 by default, giving a 64-channel feature map). With the 'small' stem a 28 px input gives a
7x7 map; with the 'imagenet' stem the map is 16x smaller than the input.
"""

from divisive_jax.models.resnet import ResNet


def tiny(width: int = 16, **kwargs) -> ResNet:
  """The tiny backbone; ``kwargs`` are `ResNet` fields (stem, dtype, bn_axis_name)."""
  return ResNet(stage_sizes=(1, 1, 1), bottleneck=False, width=width, **kwargs)
