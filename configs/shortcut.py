r"""The synthetic shortcut benchmark of Viviano et al. (arXiv 1910.00199).

28x28 binary images, one vs two crosses, a 2x3 distractor aligned with the label in training and
flipped in validation/test. Published setup: ResNet-18 with a 1-channel 3x3 stride-1 stem and no
max-pool, batch 16, up to 100 epochs, early stopping on validation loss (we keep the checkpoint
with the lowest validation loss and stop after `early_stop_patience` evaluations without
improvement). Published test AUROC (10 seeds): CE 0.00, ActDiff 1.00, masked input 0.99,
GradMask 0.76, RRR 0.49.

Variants: quick (tiny model, 20 epochs) and the methods of configs/iris_pad.py.
"""

from divisive_jax import config_base


def quick(c):
  c.model.name = "tiny"
  c.model.width = 16
  c.num_epochs = 20
  c.early_stop_patience = 6
  c.log_every_steps = 32


def get_config(arg=None):
  c = config_base.base()
  c.name = "shortcut"
  c.model.name = "resnet18"
  c.model.stem = "small"
  c.model.width = 64
  c.data.builtin = "shortcut"
  c.task = "classification"  # ROC in FPR/TPR words (PAD words: iris_pad)
  c.data.class_names = ("one_cross", "two_crosses")
  c.data.image_size = 28
  c.data.channels = 1
  c.batch_size = 16
  c.num_epochs = 100
  c.early_stop_patience = 20
  c.best_metric = "val/loss"
  c.best_mode = "min"
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  config_base.set_method(c, "ce")
  return config_base.apply_variants(c, arg, quick)
