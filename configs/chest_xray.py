r"""Chest X-ray classification (normal vs abnormal), CSV-protocol data (the CYBORG / iris-PAD protocol).

The published CYBORG recipe (DenseNet-121, 224 px, SGD, batch 20, 50 epochs, best validation
accuracy). X-rays are grayscale; they are replicated to 3 channels for ImageNet-pretrained
backbones (--config.model.pretrained_path=densenet121.pth). Imbalanced sets: add
--config.loss.class_weights=balanced. Variants as in configs/iris_pad.py.
"""

from divisive_jax import config_base


def quick(c):
  config_base.quick_tiny(c)


def get_config(arg=None):
  c = config_base.base()
  c.name = "chest_xray"
  c.task = "classification"  # ROC in FPR/TPR words (PAD words: iris_pad)
  c.data.class_names = ("normal", "abnormal")
  c.data.channels = 3
  config_base.set_method(c, "difference")
  return config_base.apply_variants(c, arg, quick)
