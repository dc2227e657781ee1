r"""Synthetic-face detection (Real vs Synthetic), CSV-protocol data (SPEC §2).

The published CYBORG recipe (DenseNet-121, 224 px RGB, SGD, batch 20, 50 epochs). Point it at
your data with --config.data.csv_path / image_dir / map_dir. Without data paths it falls back to
the built-in synthetic iris set so the pipeline can be tried (the first log line says so).
Variants as in configs/iris_pad.py.
"""

from divisive_jax import config_base


def quick(c):
  c.model.name = "tiny"
  c.model.width = 16
  c.model.stem = "small"
  c.data.image_size = 64
  c.data.num_train = 256
  c.data.num_val = 64
  c.data.num_test = 64
  c.batch_size = 32
  c.num_epochs = 3
  c.log_every_steps = 4
  c.optim.name = "adamw"
  c.optim.lr = 3e-3
  c.optim.schedule = "cosine"


def get_config(arg=None):
  c = config_base.base()
  c.name = "synthetic_faces"
  c.data.class_names = ("Real", "Synthetic")
  c.data.channels = 3
  config_base.set_method(c, "difference")
  return config_base.apply_variants(c, arg, quick)
