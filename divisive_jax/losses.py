"""Loss terms for saliency-guided training, each a pure function of (outputs, batch).

Every term returns per-sample `(values, weights)`, both (N,). `combine` reduces each term to a
weighted mean over the GLOBAL batch (a `psum` over the data axis when sharded, so 1 device and
N devices give the same loss and gradients) and adds the terms with their config weights:

    loss = sum_t lambda_t * sum_n(w_tn * v_tn) / sum_n(w_tn)

Weights: `valid` (0 on padding rows) for every term; times the per-class weight for CE; times
`has_saliency` for every saliency term, so images without a human map contribute CE only and are
never pulled toward an all-zero map. A term whose weights sum to zero contributes 0.

Notation (SPEC §1): H = human map, y = true class, ybar = the other class, norm = per-sample
min-max to [0, 1], CAM maps and H brought to one grid (`cams.to_common_grid`), MSE = mean over the
grid, Mbar = 1 - H at image resolution, x = input image, z = logits.

| term | per-sample value |
|---|---|
| `ce` | -log softmax(z)_y (K = 2) or BCE(sigmoid(z), y) (K = 1); optional class weights |
| `cyborg` | MSE(norm(CAM_t), H), t = y (default) or the predicted class (`cam_target`) |
| `difference` | MSE(norm(CAM_y - CAM_ybar), H): the CAM of z_y - z_ybar must match H |
| `opposition` | MSE(norm(CAM_y), H) + MSE(norm(CAM_ybar), 1 - H) |
| `margin` | sum(H * relu(m - (norm(CAM_y) - norm(CAM_ybar)))) / sum(H) |
| `gradmask` | sum(abs(d abs(z_0 - z_1) / dx) * Mbar)  (K = 1: d abs(z) / dx), Viviano et al. |
| `rrr` | sum((Mbar * d sum_c log softmax(z)_c / dx)^2), Ross et al. as in Viviano et al. |
| `actdiff` | L2 norm of pooled features of x minus those of x~ (x with the pixels outside the mask permuted) |

The CYBORG recipe is `ce: alpha, cyborg: 1 - alpha` (alpha = 0.5); the published margin method is
used together with the CYBORG term (`ce`, `cyborg`, `margin`). The masked-input control of Viviano
et al. is not a loss: it is `loss.mask_input` (see `step.masked_input`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from divisive_jax import cams

CAM_TERMS = ("cyborg", "difference", "opposition", "margin")
INPUT_GRAD_TERMS = ("gradmask", "rrr")
TERMS = ("ce",) + CAM_TERMS + INPUT_GRAD_TERMS + ("actdiff",)
CAM_TARGETS = ("true", "predicted")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static (hashable) description of the loss; built from `config.loss` by `from_config`."""

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
  def needs_cams(self) -> bool:
    return any(n in CAM_TERMS for n in self.names)

  @property
  def input_grad_terms(self) -> tuple[str, ...]:
    return tuple(n for n in self.names if n in INPUT_GRAD_TERMS)

  @property
  def needs_actdiff(self) -> bool:
    return "actdiff" in self.names


def parse_weights(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
  """Validate `{term: weight}`; keep the non-zero ones in the canonical order of TERMS."""
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
  """Build a LossConfig from `config.loss` (an ml_collections ConfigDict or similar)."""
  weights = loss_config.weights
  weights = weights.to_dict() if hasattr(weights, "to_dict") else dict(weights)
  cfg = LossConfig(
    weights=parse_weights(weights),
    cam_kind=loss_config.get("cam_kind", "cam"),
    cam_target=loss_config.get("cam_target", "true"),
    cam_relu=bool(loss_config.get("cam_relu", False)),
    resize=loss_config.get("resize", "map_to_cam"),
    margin=float(loss_config.get("margin", 0.2)),
    class_weights=None if class_weights is None else tuple(float(w) for w in class_weights),
    mask_input=bool(loss_config.get("mask_input", False)),
    mask_dilation=int(loss_config.get("mask_dilation", 3)),
  )
  for value, valid, field in (
    (cfg.cam_kind, cams.KINDS, "cam_kind"),
    (cfg.cam_target, CAM_TARGETS, "cam_target"),
    (cfg.resize, cams.RESIZE_MODES, "resize"),
  ):
    if value not in valid:
      raise ValueError(f"config.loss.{field}={value!r} is not one of {', '.join(valid)}")
  return cfg


def balanced_class_weights(labels, num_classes: int = 2) -> tuple[float, ...]:
  """Inverse-frequency weights n / (K * n_c) (sklearn's 'balanced'); absent classes get 0."""
  import numpy as np

  counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
  n = counts.sum()
  return tuple(float(n / (num_classes * c)) if c else 0.0 for c in counts)


# ----------------------------------------------------------------------------------- terms
def _saliency_weights(batch):
  return batch["valid"] * batch["has_saliency"]


def _mse(a, b):
  return jnp.mean((a - b) ** 2, axis=(-2, -1))


def ce(outputs, batch, cfg: LossConfig):
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


def _cams_on_grid(outputs, batch, cfg):
  """Normalised class maps (2, N, g, g) and the normalised human map on the same grid."""
  return cams.to_common_grid(outputs["maps"], batch["saliency"], cfg.resize)


def _true_false(maps, outputs, batch):
  y = batch["label"]
  return cams.select(maps, y), cams.select(maps, 1 - y)


def cyborg(outputs, batch, cfg: LossConfig):
  maps, human = _cams_on_grid(outputs, batch, cfg)
  if cfg.cam_target == "predicted":
    target = jax.lax.stop_gradient(predicted_class(outputs["logits"]))
  else:
    target = batch["label"]
  return _mse(cams.select(maps, target), human), _saliency_weights(batch)


def difference(outputs, batch, cfg: LossConfig):
  raw = outputs["maps"]
  y = batch["label"]
  contrast = cams.select(raw, y) - cams.select(raw, 1 - y)  # CAM of z_y - z_ybar
  contrast, human = cams.to_common_grid(contrast, batch["saliency"], cfg.resize)
  return _mse(contrast, human), _saliency_weights(batch)


def opposition(outputs, batch, cfg: LossConfig):
  maps, human = _cams_on_grid(outputs, batch, cfg)
  true, false = _true_false(maps, outputs, batch)
  return _mse(true, human) + _mse(false, 1.0 - human), _saliency_weights(batch)


def margin(outputs, batch, cfg: LossConfig):
  maps, human = _cams_on_grid(outputs, batch, cfg)
  true, false = _true_false(maps, outputs, batch)
  shortfall = jax.nn.relu(cfg.margin - (true - false))
  mass = jnp.sum(human, axis=(-2, -1))
  values = jnp.sum(human * shortfall, axis=(-2, -1)) / jnp.where(mass > 0, mass, 1.0)
  return values, _saliency_weights(batch)


def _outside_mask(batch):
  return (1.0 - batch["saliency"])[..., None]  # Mbar, broadcast over channels


def gradmask(outputs, batch, cfg: LossConfig):
  g = outputs["input_grads"]["gradmask"]
  return jnp.sum(jnp.abs(g) * _outside_mask(batch), axis=(1, 2, 3)), _saliency_weights(batch)


def rrr(outputs, batch, cfg: LossConfig):
  g = outputs["input_grads"]["rrr"]
  return jnp.sum((_outside_mask(batch) * g) ** 2, axis=(1, 2, 3)), _saliency_weights(batch)


def actdiff(outputs, batch, cfg: LossConfig):
  d = outputs["pooled"] - outputs["pooled_tilde"]
  return jnp.sqrt(jnp.sum(d * d, axis=-1) + _EPS_SQRT), _saliency_weights(batch)


_EPS_SQRT = 1e-12  # keeps the gradient of the L2 norm finite when x~ == x

TERM_FNS: dict[str, Callable] = {
  "ce": ce,
  "cyborg": cyborg,
  "difference": difference,
  "opposition": opposition,
  "margin": margin,
  "gradmask": gradmask,
  "rrr": rrr,
  "actdiff": actdiff,
}


# --------------------------------------------------------- cotangents of input-gradient terms
def predicted_class(logits):
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def input_grad_cotangent(name: str, logits: jax.Array) -> jax.Array:
  """d(per-sample scalar)/d logits whose input gradient the term penalises.

  gradmask: s = |z_0 - z_1| (K = 2) or |z| (K = 1).
  rrr: s = sum_c log p_c (K = 2: log softmax; K = 1: log sigmoid(z) + log sigmoid(-z)).
  The cotangent is a constant of the outer differentiation only through sign(.), as in autodiff
  of |.|; it is differentiated through the logits otherwise.
  """
  if name == "gradmask":
    if logits.shape[-1] == 1:
      return jnp.sign(logits)
    s = jnp.sign(logits[:, 0] - logits[:, 1])[:, None]
    return jnp.concatenate([s, -s], axis=-1)
  if name == "rrr":
    if logits.shape[-1] == 1:
      return 1.0 - 2.0 * jax.nn.sigmoid(logits)
    return 1.0 - logits.shape[-1] * jax.nn.softmax(logits, axis=-1)
  raise ValueError(f"{name!r} is not an input-gradient term ({', '.join(INPUT_GRAD_TERMS)})")


# ------------------------------------------------------------------------------- combine
def combine(outputs, batch, cfg: LossConfig, axis_name: str | None = None):
  """Total loss and its named parts (each part already a global weighted mean).

  Inside `shard_map` pass `axis_name`: the denominators are summed over the axis, so each
  device's loss is its share of the global mean and `psum` of the gradients is the global
  gradient. The returned parts are psum'ed too (identical on every device).
  """

  def total(x):
    return jax.lax.psum(x, axis_name) if axis_name else x

  loss = 0.0
  parts = {}
  for name, lam in cfg.weights:
    values, weights = TERM_FNS[name](outputs, batch, cfg)
    den = total(jnp.sum(weights))
    local = jnp.sum(values * weights) / jnp.where(den > 0, den, 1.0)
    loss = loss + lam * local
    parts[name] = total(jax.lax.stop_gradient(local))
  return loss, parts
