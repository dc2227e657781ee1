r"""Synthetic-face detection (Real vs Synthetic), CSV-protocol data (the CYBORG / iris-PAD protocol).

The published CYBORG recipe (DenseNet-121, 224 px RGB, SGD, batch 20, 50 epochs). Point it at
your data with --config.data.csv_path / image_dir / map_dir. Without data paths it falls back to
the built-in synthetic iris set so the pipeline can be tried (the first log line says so).
Variants as in configs/iris_pad.py.
"""

from divisive_jax import config_base


def quick(c):
  config_base.quick_tiny(c)


def get_config(arg=None):
  c = config_base.base()
  c.name = "synthetic_faces"
  c.task = "classification"  # ROC in FPR/TPR words (PAD words: iris_pad)
  c.data.class_names = ("Real", "Synthetic")
  c.data.channels = 3
  config_base.set_method(c, "difference")
  return config_base.apply_variants(c, arg, quick)
