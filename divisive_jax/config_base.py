"""Config defaults (the one source), variants and validation for `configs/*.py` (ml_collections).

A config file's ``get_config(arg)`` starts from `base()` and applies comma-separated variants, e.g.
``--config=configs/iris_pad.py:quick,difference``:

* ``quick``: CI-sized (tiny model, small images, a few epochs) -- each config defines its own;
* a method (`losses.METHODS`): sets ``config.loss.weights`` (and ``loss.mask_input`` for masked);
* ``gradcam`` / ``gradcampp``: that CAM kind for the CAM terms; ``single_logit``: a 1-logit head;
* ``vit_tiny``, ``vit_ti16``, ``vit_s16``, ``vit_b16``: that ViT (`models.vit`) as the backbone;
* ``accel``: for a GPU/TPU: bfloat16 compute (parameters, CAMs and losses stay float32), a
  global batch of 128 (`ACCEL_BATCH`) that fills one accelerator at 224 px, evaluation at 256,
  4 batches transferred ahead.

Every field the project reads is defined here with its default; nothing else supplies defaults,
and code reads fields directly (no ``get(name, default)``). `validate` checks a finished config
once, at the entry point, and raises `ConfigError` naming the field, the value and the fix.
This module imports no jax (`losses` is jax-free at import).
"""

from __future__ import annotations

import difflib
import functools
import json
import os

import ml_collections

from divisive_jax import layout, losses
from divisive_jax.errors import ConfigError, WorkdirError

VITS = ("vit_tiny", "vit_ti16", "vit_s16", "vit_b16")  # = models.vit.SIZES (no jax here)
OTHER_VARIANTS = ("gradcam", "gradcampp", "single_logit", "accel") + VITS
# Selection metrics and their direction. val/auroc ranks a binary classifier at every threshold;
# val/accuracy (at 0.5; CYBORG's published recipe) ties while a model still predicts one class.
BEST_METRICS = {"val/auroc": "max", "val/accuracy": "max", "val/loss": "min", "epoch": "max"}
ACCEL_BATCH = 128
FRACTIONS = ("shortcut_agreement", "human_map_fraction")  # config.data fields in [0, 1]
# Fields a resumed run may change: they affect logging, outputs or speed, not the trajectory
# (k steps per dispatch give the same parameters as k single steps; `test_train` checks).
SAFE_ON_RESUME = (
  "name",
  "log_every_steps",
  "checkpoint_every_steps",
  "final_eval",
  "eval_batch_size",
  "evals",
  "val_evals",
  "data.data_dir",
  "data.prefetch",
  "steps_per_dispatch",
  "population.strategy",
)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.method = "ce"
  c.task = "pad"  # pad: ISO/IEC 30107-3 words (APCER/BPCER); classification: FPR/TPR
  c.seed = 0
  c.batch_size = 20
  c.eval_batch_size = 0  # 0: same as batch_size
  c.num_epochs = 50
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.eval_every_epochs = 1.0
  c.eval_every_steps = 0  # > 0 overrides eval_every_epochs
  c.checkpoint_every_steps = 0  # 0: at every evaluation
  c.log_every_steps = 50  # also logged at least every LOG_EVERY_SECONDS (writers.py)
  c.best_metric = "val/auroc"  # one of BEST_METRICS; ties: the lower val/loss, then earlier
  c.best_mode = "auto"  # auto: the metric's direction (BEST_METRICS); max | min must agree
  c.early_stop_patience = 0  # > 0: stop after this many evaluations without improvement
  c.final_eval = True  # evaluate the best checkpoint on val and test at the end
  c.steps_per_dispatch = 1  # > 1: k steps a dispatch (lax.scan; data.on_device), events exact
  # N runs in one program (divisive_jax.members, divisive_jax.train): one member per seed x weight setting.
  c.population = ml_collections.ConfigDict()
  c.population.seeds = ""  # e.g. "0,1,2"; '' = config.seed alone
  c.population.weights = ""  # e.g. "rrr=1,10,100;gradmask=0.1,1" (term=values; a product)
  c.population.strategy = "auto"  # vmap | unroll | auto (unroll on CPU): step.over_members
  # Evaluators of the final evaluation and of `divisive_jax.evaluate` (evaluators/common.py).
  c.evals = ml_collections.ConfigDict(
    {"pad": {}, "alignment": {"top_p": 0.1, "mask_threshold": 0.5}, "entropy": {}}
  )
  # Evaluators of the validation runs during training (metrics.jsonl, TensorBoard): 'pad' gives
  # val/accuracy, val/auroc, val/loss (the selection metrics); 'tb_images' the CAM strips;
  # 'alignment' and 'entropy' add their figures as val/<name>/... scalars.
  c.val_evals = ml_collections.ConfigDict({"pad": {}, "tb_images": {"max_images": 4}})

  c.model = ml_collections.ConfigDict()
  c.model.name = "densenet121"
  c.model.num_outputs = 2
  c.model.stem = "imagenet"
  c.model.width = 64
  c.model.dtype = "float32"
  c.model.pool = "gap"  # ViT: gap (A = final patch tokens, exact CAM) | cls (models/vit.py)
  c.model.patch_size = 0  # ViT: 0 = the model's own (16; vit_tiny 8)
  c.model.vit_style = "torchvision"  # ViT: torchvision (and timm) | big_vision (models/vit.py)
  c.model.bn_group = 0  # BatchNorm statistics over groups of this many devices (0: all; sharding)
  c.model.pretrained_path = ""  # torchvision weights (.pth, .safetensors, .npz) you already have

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
  # builtin synthetic_iris: P(shortcut mark | Spoof) = 1 - P(mark | Live) in TRAIN (val/test:
  # 1/2 whatever the label); 0.5 = no shortcut (data/synthetic.py).
  c.data.shortcut_agreement = 1.0
  c.data.augment_flip = False  # on the device, from (seed, step, row): preprocess.py
  c.data.augment_crop = 0
  c.data.on_device = False  # keep the training split on the device(s) (sets that fit)
  c.data.prefetch = 2  # host batches transferred to the device ahead of the step
  c.data.shuffle_seed = -1  # the order of the training examples; -1: config.seed
  c.data.saliency_control = "none"  # none | shuffled | inverted | random (data/controls.py)
  c.data.map_source = "human"  # human | pca | lda: maps for examples without (data/map_sources.py)
  c.data.human_map_fraction = 1.0  # of the training maps kept, seeded; the rest withheld (same)

  c.loss = ml_collections.ConfigDict()
  c.loss.weights = ml_collections.ConfigDict({t: 0.0 for t in losses.TERMS})
  c.loss.cam_kind = "cam"  # cams.KINDS: cam | gradcam | gradcampp
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
  if method not in losses.METHODS:
    raise ConfigError(f"unknown method {method!r}; valid: {', '.join(losses.METHODS)}")
  c.method = method
  for t in losses.TERMS:
    c.loss.weights[t] = losses.METHODS[method].get(t, 0.0)
  c.loss.mask_input = method == "masked"


def apply_variants(
  c: ml_collections.ConfigDict, arg: str | None, quick
) -> ml_collections.ConfigDict:
  """Apply comma-separated variants; ``quick(c)`` is the config file's own CI-sized variant."""
  for token in filter(None, (t.strip() for t in (arg or "").replace(":", ",").split(","))):
    if token == "quick":
      quick(c)
    elif token in losses.METHODS:
      set_method(c, token)
    elif token in ("gradcam", "gradcampp"):
      c.loss.cam_kind = token
    elif token in VITS:  # a ViT in place of the CNN (its size is its name: no stem, width)
      c.model.update(name=token, stem="imagenet", width=64)
    elif token == "single_logit":
      c.model.num_outputs = 1
    elif token == "accel":
      c.model.dtype = "bfloat16"
      c.batch_size = ACCEL_BATCH
      c.eval_batch_size = 2 * ACCEL_BATCH
      c.data.prefetch = 4
    else:
      raise ConfigError(
        f"unknown config variant {token!r}; valid: quick, "
        f"{', '.join(losses.METHODS)}, {', '.join(OTHER_VARIANTS)}"
      )
  c.name = f"{c.name}_{c.method}" if c.method not in c.name else c.name
  return c


# ------------------------------------------------------------------------------ validation
def _close(name: str, valid) -> str:
  valid = [str(v) for v in valid]
  near = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
  return f"; did you mean {' or '.join(near)}?" if near else f"; valid: {', '.join(valid)}"


def check_fields(config, reference=None, prefix: str = "config") -> None:
  """Every field of ``config`` must exist in ``reference`` (default `base()`), recursively."""
  reference = base() if reference is None else reference
  for key in config.keys():
    path = f"{prefix}.{key}"
    if key not in reference:
      raise ConfigError(f"unknown field {path}{_close(key, reference.keys())}")
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and key not in ("evals", "val_evals"):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{path} must be a group of fields, got {value!r}")
      check_fields(value, ref, path)


def _choice(path: str, value, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{path}={value!r} is not valid{_close(str(value), valid)}")


def validate(config) -> None:
  """Check a finished config; `ConfigError` names the field, the value and the fix."""
  from divisive_jax import cams, models, optim, plots
  from divisive_jax.data import CHOICES as DATA_CHOICES
  from divisive_jax.evaluators import EVALUATORS

  check_fields(config)
  _choice("config.task", config.task, plots.ROC_TASKS)
  _choice("config.model.name", config.model.name, models.BACKBONES)
  _choice("config.model.stem", config.model.stem, models.STEMS)
  _choice("config.model.dtype", config.model.dtype, models.DTYPES)
  _choice("config.model.num_outputs", config.model.num_outputs, (1, 2))
  models.check(config)
  _choice("config.optim.name", config.optim.name, optim.OPTIMIZERS)
  _choice("config.optim.schedule", config.optim.schedule, optim.SCHEDULES)
  _choice("config.loss.cam_kind", config.loss.cam_kind, tuple(cams.KINDS))
  _choice("config.loss.cam_target", config.loss.cam_target, losses.CAM_TARGETS)
  _choice("config.loss.resize", config.loss.resize, cams.RESIZE_MODES)
  _choice("config.loss.class_weights", config.loss.class_weights, ("none", "balanced"))
  _choice("config.best_metric", config.best_metric, BEST_METRICS)
  _choice("config.best_mode", config.best_mode, ("auto", "max", "min"))
  quality = config.best_metric != "epoch"  # epoch: max = the latest evaluation, min = the first
  if quality and config.best_mode not in ("auto", BEST_METRICS[config.best_metric]):
    raise ConfigError(
      f"config.best_mode={config.best_mode!r} would choose the worst {config.best_metric}; "
      f"{config.best_metric} is better when it is {BEST_METRICS[config.best_metric]}er. Fix: "
      "--config.best_mode=auto"
    )
  _choice("config.data.channels", config.data.channels, (1, 3))
  for field, valid in DATA_CHOICES.items():
    _choice(f"config.data.{field}", config.data[field], valid)
  names = tuple(config.data.class_names)
  if len(names) != 2 or len(set(names)) != 2 or not all(str(n).strip() for n in names):
    raise ConfigError(
      f"config.data.class_names={names!r} must name two different classes (negative, then "
      "positive: the attack / abnormal class). On the command line: "
      "--config.data.class_names=\"('NonFace', 'Face')\" (a bare NonFace,Face is one name)"
    )
  _check_evals("config.evals", config.evals, EVALUATORS, CONFIGURABLE_EVALS)
  _check_evals("config.val_evals", config.val_evals, EVALUATORS, VAL_EVALS)
  try:
    losses.parse_weights(config.loss.weights.to_dict())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _choice("config.population.strategy", config.population.strategy, ("auto", "vmap", "unroll"))
  bounds = (  # (field, within bounds, what it must be)
    ("eval_batch_size", int(config.eval_batch_size) >= 0, "must be >= 0 (0: batch_size)"),
    *((f"data.{f}", 0 <= float(config.data[f]) <= 1, "must be in [0, 1]") for f in FRACTIONS),
    ("optim.lr", float(config.optim.lr) > 0, "must be positive; e.g. --config.optim.lr=0.005"),
    ("batch_size", int(config.batch_size) > 0, "must be positive"),
    ("data.image_size", int(config.data.image_size) > 0, "must be positive"),
    ("steps_per_dispatch", int(config.steps_per_dispatch) >= 1, "must be >= 1"),
    ("optim.momentum", 0 <= float(config.optim.momentum) < 1, "must be in [0, 1)"),
    ("optim.weight_decay", float(config.optim.weight_decay) >= 0, "must be >= 0"),
  )
  for path, ok, need in bounds:
    if not ok:
      raise ConfigError(
        f"config.{path}={functools.reduce(getattr, path.split('.'), config)} {need}"
      )
  if int(config.num_train_steps) <= 0 and int(config.num_epochs) <= 0:
    raise ConfigError(
      "config.num_epochs and config.num_train_steps are both <= 0: nothing to train; set "
      "--config.num_epochs=N"
    )
  if int(config.steps_per_dispatch) > 1 and not config.data.on_device:
    raise ConfigError(
      f"config.steps_per_dispatch={config.steps_per_dispatch} needs the training split on the "
      "device: add --config.data.on_device=True (for sets that fit in device memory) or set "
      "--config.steps_per_dispatch=1"
    )


CONFIGURABLE_EVALS = ("pad", "alignment", "entropy")  # divergence: explain's
VAL_EVALS = CONFIGURABLE_EVALS + ("tb_images",)


def _check_evals(field: str, evals, registry, valid) -> None:
  """``config.evals`` / ``config.val_evals``: known evaluators with valid options, the PAD
  report among them (it chooses thresholds and gives the selection metrics). Each is built once
  with a dummy context, so a bad option stops the run now rather than at an evaluation."""
  from divisive_jax.evaluators import Context

  for name in evals.keys():
    _choice(field, name, valid)
  if "pad" not in evals:
    raise ConfigError(f"{field} needs 'pad' (thresholds and selection metrics come from it)")
  for name, options in evals.items():
    try:
      registry[name](Context("val", ("a", "b")), **dict(options))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{field}.{name}: {e}") from None


# --------------------------------------------------------------------------- stored configs
def to_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_stored(stored: dict) -> ml_collections.ConfigDict:
  """A config stored by `to_json` (parsed), on today's defaults (fields added since are filled)."""
  c = base()
  _merge(c, stored)
  return c


def _merge(c, stored: dict) -> None:
  for key, value in stored.items():
    if key in c and isinstance(c[key], ml_collections.ConfigDict) and isinstance(value, dict):
      if key in ("evals", "val_evals"):
        c[key] = ml_collections.ConfigDict(value)
      else:
        _merge(c[key], value)
    elif key in c and isinstance(c[key], tuple) and isinstance(value, list):
      c[key] = tuple(value)
    else:
      with c.unlocked():
        c[key] = value


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its ``config.json``, on today's defaults)."""
  file = layout.path(workdir, layout.CONFIG)
  if not os.path.exists(file):
    raise WorkdirError(
      f"{file} not found: is {workdir} a divisive_jax workdir? Train with "
      "python -m divisive_jax.main --config=... --workdir=..."
    )
  return from_stored(layout.read_config(workdir))


def shuffle_seed(config) -> int:
  """The seed of the training order: ``data.shuffle_seed``, or ``seed`` when it is -1."""
  return int(config.seed) if int(config.data.shuffle_seed) < 0 else int(config.data.shuffle_seed)


def differences(old, new) -> list[tuple[str, object, object]]:
  """[(dotted field, old value, new value)] for every field that differs (JSON-normalised)."""
  return _diff(json.loads(to_json(old)), json.loads(to_json(new)), "")


def _diff(a: dict, b: dict, prefix: str) -> list:
  out = []
  for key in sorted(set(a) | set(b)):
    path, va, vb = f"{prefix}{key}", a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{path}.")
    elif va != vb:
      out.append((path, va, vb))
  return out


def safe_on_resume(field: str) -> bool:
  return any(field == s or field.startswith(f"{s}.") for s in SAFE_ON_RESUME)


def unsafe_differences(old, new) -> list[tuple[str, object, object]]:
  """The fields in which two configs differ that change what is trained (`SAFE_ON_RESUME`
  aside): none means the same experiment (resume, reuse a trained member)."""
  return [d for d in differences(old, new) if not safe_on_resume(d[0])]
