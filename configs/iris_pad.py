r"""Iris presentation-attack detection (Live vs Spoof).

Default: the published CYBORG recipe (DenseNet-121, 224 px, SGD lr 0.005 x0.1 every 12 epochs,
batch 20, 50 epochs, best validation accuracy kept) with the Divisive Decisions `difference` loss.
With no data paths it trains on the built-in synthetic iris-PAD set; point it at your data with

  python -m divisive_jax.main --config=configs/iris_pad.py --workdir=W \
    --config.data.csv_path=/data/iris/protocol.csv --config.data.image_dir=/data/iris/images \
    --config.data.map_dir=/data/iris/maps

The built-in set (`divisive_jax/data/synthetic.py`) is a test of saliency guidance: the iris
texture tells the classes apart, and in train a bright corner square (outside the human map)
marks every Spoof image; in val/test it is on half the images of each class.
`--config.data.shortcut_agreement=0.5` gives the same data without the shortcut (the control).

Variants (comma-separated): quick, ce, cyborg, difference, opposition, margin, gradmask, rrr,
actdiff, masked, gradcam, single_logit. E.g. `configs/iris_pad.py:quick,cyborg`.
"""

from divisive_jax import config_base


def quick(c):
  """CI-sized: tiny ResNet, 64 px gray synthetic iris, 6 epochs (72 steps; ~30 s on 2 CPU cores)."""
  config_base.quick_tiny(c, num_train=384, num_eval=128, num_epochs=6)
  c.data.channels = 1


def get_config(arg=None):
  c = config_base.base()
  c.name = "iris_pad"
  c.data.builtin = "synthetic_iris"
  c.data.class_names = ("Live", "Spoof")
  c.data.attack_type_from = "column"
  config_base.set_method(c, "difference")
  return config_base.apply_variants(c, arg, quick)
