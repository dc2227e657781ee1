"""Shared config defaults and variants for `configs/*.py` (ml_collections).

A config file's `get_config(arg)` starts from `base()` and applies comma-separated variants, e.g.
`--config=configs/iris_pad.py:quick,difference`:

* `quick`: CI-sized (tiny model, small images, a few epochs) — each config defines its own.
* a method (`METHODS`): sets `config.loss.weights` (and `loss.mask_input` for `masked`).
* `gradcam`: Grad-CAM instead of CAM for the CAM terms; `single_logit`: a 1-logit head.
"""

from __future__ import annotations

import ml_collections

from divisive_jax import losses

# method -> loss weights (CYBORG's alpha = 0.5 convention: alpha * CE + (1 - alpha) * term).
METHODS = {
  "ce": {"ce": 1.0},
  "cyborg": {"ce": 0.5, "cyborg": 0.5},
  "difference": {"ce": 0.5, "difference": 0.5},
  "opposition": {"ce": 0.5, "opposition": 0.5},
  "margin": {"ce": 0.5, "cyborg": 0.5, "margin": 0.5},
  "gradmask": {"ce": 1.0, "gradmask": 1.0},
  "rrr": {"ce": 1.0, "rrr": 1.0},
  "actdiff": {"ce": 1.0, "actdiff": 1.0},
  "masked": {"ce": 1.0},
}
OTHER_VARIANTS = ("gradcam", "single_logit")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.method = "ce"
  c.seed = 0
  c.batch_size = 20
  c.eval_batch_size = 0  # 0: same as batch_size
  c.num_epochs = 50
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.eval_every_epochs = 1.0
  c.eval_every_steps = 0  # > 0 overrides eval_every_epochs
  c.checkpoint_every_steps = 0  # 0: at every evaluation
  c.log_every_steps = 50
  c.best_metric = "val/accuracy"  # val/accuracy | val/auroc | val/loss
  c.best_mode = "max"
  c.early_stop_patience = 0  # > 0: stop after this many evaluations without improvement
  c.final_eval = True  # evaluate the best checkpoint on val and test at the end

  c.model = ml_collections.ConfigDict()
  c.model.name = "densenet121"
  c.model.num_outputs = 2
  c.model.stem = "imagenet"
  c.model.width = 64
  c.model.dtype = "float32"
  c.model.pretrained_path = ""  # a torchvision state dict (.pth) you already have

  c.data = ml_collections.ConfigDict()
  c.data.builtin = "synthetic_iris"
  c.data.csv_path = ""
  c.data.image_dir = ""
  c.data.map_dir = ""
  c.data.class_names = ("Live", "Spoof")
  c.data.map_suffix = ""
  c.data.image_size = 224
  c.data.channels = 3
  c.data.data_dir = ""  # '' -> <workdir>/data
  c.data.attack_type_from = "none"  # none | column | path
  c.data.heldout_attack = ""
  c.data.num_train = 600
  c.data.num_val = 200
  c.data.num_test = 200
  c.data.seed = 0
  c.data.augment_flip = False
  c.data.augment_crop = 0

  c.loss = ml_collections.ConfigDict()
  c.loss.weights = ml_collections.ConfigDict({t: 0.0 for t in losses.TERMS})
  c.loss.cam_kind = "cam"  # cam | gradcam
  c.loss.cam_target = "true"  # true | predicted (CYBORG's first release)
  c.loss.cam_relu = False
  c.loss.resize = "map_to_cam"  # map_to_cam | cam_to_map
  c.loss.margin = 0.2
  c.loss.class_weights = "none"  # none | balanced
  c.loss.mask_input = False
  c.loss.mask_dilation = 3

  # CYBORG's published recipe.
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"
  c.optim.lr = 0.005
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-6
  c.optim.schedule = "step"
  c.optim.decay_every_epochs = 12.0
  c.optim.decay_factor = 0.1
  c.optim.warmup_epochs = 0.0
  set_method(c, "ce")
  return c


def quick_tiny(
  c: ml_collections.ConfigDict, *, num_train: int = 256, num_eval: int = 64, num_epochs: int = 3
) -> None:
  """CI-sized: tiny ResNet at 64 px, AdamW with cosine decay, a few epochs on 2 CPU cores."""
  c.model.name = "tiny"
  c.model.width = 16
  c.model.stem = "small"
  c.data.image_size = 64
  c.data.num_train = num_train
  c.data.num_val = num_eval
  c.data.num_test = num_eval
  c.batch_size = 32
  c.num_epochs = num_epochs
  c.log_every_steps = 4
  c.optim.name = "adamw"
  c.optim.lr = 3e-3
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_epochs = 0.5


def set_method(c: ml_collections.ConfigDict, method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
  c.method = method
  for term in losses.TERMS:
    c.loss.weights[term] = METHODS[method].get(term, 0.0)
  c.loss.mask_input = method == "masked"


def apply_variants(
  c: ml_collections.ConfigDict, arg: str | None, quick
) -> ml_collections.ConfigDict:
  """Apply comma-separated variants; `quick(c)` is the config file's own CI-sized variant."""
  for token in filter(None, (t.strip() for t in (arg or "").replace(":", ",").split(","))):
    if token == "quick":
      quick(c)
    elif token in METHODS:
      set_method(c, token)
    elif token == "gradcam":
      c.loss.cam_kind = "gradcam"
    elif token == "single_logit":
      c.model.num_outputs = 1
    else:
      raise ValueError(
        f"unknown config variant {token!r}; valid: quick, "
        f"{', '.join(METHODS)}, {', '.join(OTHER_VARIANTS)}"
      )
  c.name = f"{c.name}_{c.method}" if c.method not in c.name else c.name
  return c
