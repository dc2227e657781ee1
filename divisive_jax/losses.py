"""Loss terms for saliency-guided training: a registry in which each term is one entry.

A term is a pure function ``fn(outputs, batch, cfg) -> (values (N,), weights (N,))`` registered
with `term`, declaring what it needs from the forward pass (`step.forward` computes exactly
the union of what the enabled terms need):

* ``"maps"``: both class maps (2, N, h, w) from one vjp of the head (`cams`);
* ``"input_grad"``: the input gradient of a per-sample scalar of the logits; the term gives
  that scalar's cotangent ``cotangent(logits)`` and finds ``outputs["input_grads"][name]``;
* ``"pooled_tilde"``: pooled features of x and of x~ (the pixels outside the human mask
  permuted with per-sample keys drawn from (seed, step, global row)).

`combine` reduces each term to a weighted mean over the GLOBAL batch (a ``psum`` over the data
axis when sharded, so 1 device and N devices give the same loss and gradients) and adds the
terms with their weights ``lambda_t``, which are runtime values (`TrainState.loss_weights`):
changing them never recompiles the step::

    loss = sum_t lambda_t * sum_n(w_tn * v_tn) / sum_n(w_tn)

Per-sample weights: ``valid`` (0 on padding rows) for every term; times the class weight for
CE; times ``has_saliency`` for every saliency term, so images without a human map contribute CE
only and are never pulled toward an all-zero map. A term whose weights sum to zero adds 0.

Notation: H = human map, y = true class, ybar = the other class, norm = per-sample min-max to
[0, 1], CAM maps and H brought to one grid (`cams.to_common_grid`), MSE = mean over the grid,
Mbar = 1 - H at image resolution, x = input image, z = logits.

| term | per-sample value |
|---|---|
| `ce` | -log softmax(z)_y (K = 2) or BCE(sigmoid(z), y) (K = 1); optional class weights |
| `cyborg` | MSE(norm(CAM_t), H), t = y (default) or the predicted class (`cam_target`) |
| `difference` | MSE(norm(CAM_y - CAM_ybar), H): the CAM of z_y - z_ybar must match H |
| `opposition` | MSE(norm(CAM_y), H) + MSE(norm(CAM_ybar), 1 - H) |
| `margin` | sum(H * relu(m - (norm(CAM_y) - norm(CAM_ybar)))) / sum(H) |
| `gradmask` | sum(abs(d abs(z_0 - z_1) / dx) * Mbar)  (K = 1: d abs(z) / dx), Viviano et al. |
| `rrr` | sum((Mbar * d sum_c log softmax(z)_c / dx)^2), Ross et al. as in Viviano et al. |
| `actdiff` | L2 norm of pooled features of x minus those of x~ |

Methods (`METHODS`) are recipes of term weights, kept beside the terms. The CYBORG recipe is
``ce: alpha, cyborg: 1 - alpha`` (alpha = 0.5); margin is used together with the CYBORG term; the
masked-input control of Viviano et al. is not a term but an input transform (``mask_input``).

This module imports no jax at load time (the term functions import it when traced), so the
config files can list the terms and methods without starting jax.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

NEEDS = ("maps", "input_grad", "pooled_tilde")
CAM_TARGETS = ("true", "predicted")
_EPS_SQRT = 1e-12  # keeps the gradient of the L2 norm finite when x~ == x


@dataclasses.dataclass(frozen=True)
class Term:
  name: str
  fn: Callable  # (outputs, batch, cfg) -> (values (N,), weights (N,))
  needs: frozenset
  cotangent: Callable | None = None  # input-gradient terms: logits -> d scalar / d logits


TERMS: dict[str, Term] = {}


def term(name: str, needs: tuple[str, ...] = (), cotangent: Callable | None = None):
  """Decorator registering a term function under ``name``."""
  unknown = set(needs) - set(NEEDS)
  if unknown or ("input_grad" in needs) != (cotangent is not None):
    raise ValueError(
      f"term {name!r}: needs {needs} must be among {NEEDS}; input-gradient terms "
      "(and only they) give a cotangent"
    )

  def register(fn):
    TERMS[name] = Term(name, fn, frozenset(needs), cotangent)
    return fn

  return register


# method -> term weights (CYBORG's alpha = 0.5 convention: alpha * CE + (1 - alpha) * term).
METHODS = {
  "ce": {"ce": 1.0},
  "cyborg": {"ce": 0.5, "cyborg": 0.5},
  "difference": {"ce": 0.5, "difference": 0.5},
  "opposition": {"ce": 0.5, "opposition": 0.5},
  "margin": {"ce": 0.5, "cyborg": 0.5, "margin": 0.5},
  "gradmask": {"ce": 1.0, "gradmask": 1.0},
  "rrr": {"ce": 1.0, "rrr": 1.0},
  "actdiff": {"ce": 1.0, "actdiff": 1.0},
  "masked": {"ce": 1.0},  # + loss.mask_input
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static (hashable) description of the loss, built from ``config.loss`` by `from_config`.

  ``weights`` name the enabled terms (canonical order) with default weights; the step takes
  the weights actually used at run time from the train state, so only the set of enabled terms
  and the fields below are constants of the compiled program.
  """

  weights: tuple[tuple[str, float], ...] = (("ce", 1.0),)
  cam_kind: str = "cam"
  cam_target: str = "true"
  cam_relu: bool = False
  resize: str = "map_to_cam"
  margin: float = 0.2
  class_weights: tuple[float, ...] | None = None
  mask_input: bool = False
  mask_dilation: int = 3

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(n for n, _ in self.weights)

  @property
  def needs(self) -> frozenset:
    return frozenset().union(*(TERMS[n].needs for n in self.names))

  def terms_needing(self, need: str) -> tuple[str, ...]:
    return tuple(n for n in self.names if need in TERMS[n].needs)


def parse_weights(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
  """Validate ``{term: weight}``; keep the positive ones in the canonical order of TERMS."""
  weights = dict(weights)
  unknown = sorted(set(weights) - set(TERMS))
  if unknown:
    raise ValueError(
      f"unknown loss term(s) {unknown} in config.loss.weights; valid terms: {', '.join(TERMS)}"
    )
  bad = {k: v for k, v in weights.items() if not (float(v) >= 0.0)}
  if bad:
    raise ValueError(f"loss weights must be >= 0, got {bad} in config.loss.weights")
  kept = tuple((n, float(weights[n])) for n in TERMS if float(weights.get(n, 0.0)) > 0.0)
  if not kept:
    raise ValueError(
      "config.loss.weights has no positive weight; set e.g. --config.loss.weights.ce=1.0"
    )
  return kept


def from_config(loss_config, class_weights: tuple[float, ...] | None = None) -> LossConfig:
  """A LossConfig from ``config.loss`` (defaults come from `config_base`, not from here; its
  choices are checked by `config_base.validate`)."""
  weights = loss_config.weights
  weights = weights.to_dict() if hasattr(weights, "to_dict") else dict(weights)
  return LossConfig(
    weights=parse_weights(weights),
    cam_kind=loss_config.cam_kind,
    cam_target=loss_config.cam_target,
    cam_relu=bool(loss_config.cam_relu),
    resize=loss_config.resize,
    margin=float(loss_config.margin),
    class_weights=None if class_weights is None else tuple(float(w) for w in class_weights),
    mask_input=bool(loss_config.mask_input),
    mask_dilation=int(loss_config.mask_dilation),
  )


def balanced_class_weights(labels, num_classes: int = 2) -> tuple[float, ...]:
  """Inverse-frequency weights n / (K * n_c) (sklearn's 'balanced'); absent classes get 0."""
  import numpy as np

  counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
  n = counts.sum()
  return tuple(float(n / (num_classes * c)) if c else 0.0 for c in counts)


def predicted_class(logits):
  import jax.numpy as jnp

  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------ helpers
def _saliency_weights(batch):
  return batch["valid"] * batch["has_saliency"]


def _mse(a, b):
  return ((a - b) ** 2).mean(axis=(-2, -1))


def _cams_on_grid(outputs, batch, cfg):
  """Normalised class maps (2, N, g, g) and the normalised human map on the same grid."""
  from divisive_jax import cams

  return cams.to_common_grid(outputs["maps"], batch["saliency"], cfg.resize)


def _true_false(maps, batch):
  from divisive_jax import cams

  y = batch["label"]
  return cams.select(maps, y), cams.select(maps, 1 - y)


def _outside_mask(batch):
  return (1.0 - batch["saliency"])[..., None]  # Mbar, broadcast over channels


# -------------------------------------------------------------------------------------- terms
@term("ce")
def ce(outputs, batch, cfg: LossConfig):
  import jax
  import jax.numpy as jnp

  z, y = outputs["logits"], batch["label"]
  if z.shape[-1] == 1:
    z = z[:, 0]
    values = jax.nn.softplus(z) - y * z  # BCE with logits
  else:
    values = -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=-1)[:, 0]
  weights = batch["valid"]
  if cfg.class_weights is not None:
    weights = weights * jnp.asarray(cfg.class_weights, values.dtype)[y]
  return values, weights


@term("cyborg", needs=("maps",))
def cyborg(outputs, batch, cfg: LossConfig):
  import jax

  from divisive_jax import cams

  maps, human = _cams_on_grid(outputs, batch, cfg)
  if cfg.cam_target == "predicted":
    target = jax.lax.stop_gradient(predicted_class(outputs["logits"]))
  else:
    target = batch["label"]
  return _mse(cams.select(maps, target), human), _saliency_weights(batch)


@term("difference", needs=("maps",))
def difference(outputs, batch, cfg: LossConfig):
  from divisive_jax import cams

  raw = outputs["maps"]
  y = batch["label"]
  contrast = cams.select(raw, y) - cams.select(raw, 1 - y)  # CAM of z_y - z_ybar
  contrast, human = cams.to_common_grid(contrast, batch["saliency"], cfg.resize)
  return _mse(contrast, human), _saliency_weights(batch)


@term("opposition", needs=("maps",))
def opposition(outputs, batch, cfg: LossConfig):
  maps, human = _cams_on_grid(outputs, batch, cfg)
  true, false = _true_false(maps, batch)
  return _mse(true, human) + _mse(false, 1.0 - human), _saliency_weights(batch)


@term("margin", needs=("maps",))
def margin(outputs, batch, cfg: LossConfig):
  import jax
  import jax.numpy as jnp

  maps, human = _cams_on_grid(outputs, batch, cfg)
  true, false = _true_false(maps, batch)
  shortfall = jax.nn.relu(cfg.margin - (true - false))
  mass = jnp.sum(human, axis=(-2, -1))
  values = jnp.sum(human * shortfall, axis=(-2, -1)) / jnp.where(mass > 0, mass, 1.0)
  return values, _saliency_weights(batch)


def _gradmask_cotangent(logits):
  """d s / d logits for s = |z_0 - z_1| (K = 2) or |z| (K = 1)."""
  import jax.numpy as jnp

  if logits.shape[-1] == 1:
    return jnp.sign(logits)
  s = jnp.sign(logits[:, 0] - logits[:, 1])[:, None]
  return jnp.concatenate([s, -s], axis=-1)


def _rrr_cotangent(logits):
  """d s / d logits for s = sum_c log p_c (K = 2: log softmax; K = 1: log sigmoid(+-z))."""
  import jax

  if logits.shape[-1] == 1:
    return 1.0 - 2.0 * jax.nn.sigmoid(logits)
  return 1.0 - logits.shape[-1] * jax.nn.softmax(logits, axis=-1)


@term("gradmask", needs=("input_grad",), cotangent=_gradmask_cotangent)
def gradmask(outputs, batch, cfg: LossConfig):
  g = outputs["input_grads"]["gradmask"]
  return (abs(g) * _outside_mask(batch)).sum(axis=(1, 2, 3)), _saliency_weights(batch)


@term("rrr", needs=("input_grad",), cotangent=_rrr_cotangent)
def rrr(outputs, batch, cfg: LossConfig):
  g = outputs["input_grads"]["rrr"]
  return ((_outside_mask(batch) * g) ** 2).sum(axis=(1, 2, 3)), _saliency_weights(batch)


@term("actdiff", needs=("pooled_tilde",))
def actdiff(outputs, batch, cfg: LossConfig):
  import jax.numpy as jnp

  d = outputs["pooled"] - outputs["pooled_tilde"]
  return jnp.sqrt(jnp.sum(d * d, axis=-1) + _EPS_SQRT), _saliency_weights(batch)


CAM_TERMS = tuple(n for n, t in TERMS.items() if "maps" in t.needs)


def input_grad_cotangent(name: str, logits):
  """The cotangent of an input-gradient term's per-sample scalar (see the term's docstring).

  It is a constant of the outer differentiation only through sign(.), as in autodiff of |.|;
  it is differentiated through the logits otherwise.
  """
  t = TERMS.get(name)
  if t is None or t.cotangent is None:
    grads = [n for n, x in TERMS.items() if x.cotangent is not None]
    raise ValueError(f"{name!r} is not an input-gradient term ({', '.join(grads)})")
  return t.cotangent(logits)


# -------------------------------------------------------------------------------- combine
def combine(outputs, batch, cfg: LossConfig, axis_name: str | None = None, weights=None):
  """Total loss and its named parts (each part already a global weighted mean).

  ``weights``: {term: scalar} used at run time (default: ``cfg.weights``). Inside `shard_map`
  pass ``axis_name``: the denominators are summed over the axis, so each device's loss is its
  share of the global mean and ``psum`` of the gradients is the global gradient. The returned
  parts are psum'ed too (identical on every device).
  """
  import jax
  import jax.numpy as jnp

  def total(x):
    return jax.lax.psum(x, axis_name) if axis_name else x

  lambdas = dict(cfg.weights) if weights is None else weights
  loss = 0.0
  parts = {}
  for name in cfg.names:
    values, w = TERMS[name].fn(outputs, batch, cfg)
    den = total(jnp.sum(w))
    local = jnp.sum(values * w) / jnp.where(den > 0, den, 1.0)
    loss = loss + lambdas[name] * local
    parts[name] = total(jax.lax.stop_gradient(local))
  return loss, parts
