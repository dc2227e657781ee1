"""Train and eval steps: `jax.jit` of a `jax.shard_map` over a 1-D ('data',) mesh.

The state is replicated (`P()`), batches are split along the batch axis (`P('data')`). Inside the
map each device computes its share of the global weighted-mean loss (`losses.combine` sums the
denominators over the axis) and BatchNorm statistics are synchronised by the model's
`bn_axis_name='data'`. Gradients of replicated parameters are summed over the axis by the
transpose of shard_map's implicit broadcast (`check_vma=True`), so every device applies the same
update and 1 device and N devices follow the same trajectory. The state is donated.

One forward pass serves every loss term: the head's vjp gives the logits and both class CAMs
(`cams.maps_from_vjp`); input-gradient terms (GradMask, RRR) reuse the backbone's vjp; ActDiff
adds one forward pass of x~.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from divisive_jax import cams, losses

AXIS = "data"
DEVICE_KEYS = ("image", "label", "saliency", "has_saliency", "valid")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # PRNG key data (uint32) for stochastic loss terms (ActDiff). Runtime data, not a constant of
  # the compiled program, so runs with different seeds share one compilation.
  rng: Any = None


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over all devices of all processes."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def to_global(local_batch: dict, mesh) -> dict:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
    for k in DEVICE_KEYS
  }


def to_host(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-process) array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --------------------------------------------------------------------------- input transforms
def human_mask(batch, threshold: float = 0.5):
  """Binary human mask (N, H, W): 1 inside; all ones where the example has no map."""
  inside = (batch["saliency"] > threshold).astype(batch["image"].dtype)
  return jnp.where(batch["has_saliency"][:, None, None] > 0, inside, 1.0)


def masked_input(batch, dilation: int):
  """Viviano et al.'s masked-input control: x * dilate(M) (examples without a map unchanged)."""
  m = human_mask(batch)[..., None]
  if dilation > 1:
    m = jax.lax.reduce_window(
      m, -jnp.inf, jax.lax.max, (1, dilation, dilation, 1), (1, 1, 1, 1), "SAME"
    )
  return batch["image"] * m


def permute_outside(x, mask, keys):
  """x~ for ActDiff: per sample, the pixels where mask == 0 randomly permuted among themselves.

  `keys` holds one PRNG key per sample, so x~ does not depend on how the batch is sharded.
  """
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c)
  outside = mask.reshape(n, h * w) < 0.5
  pos = jnp.arange(h * w)
  # Outside positions first (ascending / in random order), inside positions after, ascending:
  # the two orders agree on the inside part, so only outside pixels move.
  order = jnp.argsort(jnp.where(outside, pos, h * w + pos), axis=1)
  rand = jax.vmap(lambda k: jax.random.uniform(k, (h * w,)))(keys)
  perm = jnp.argsort(jnp.where(outside, rand, 2.0 + pos.astype(jnp.float32)), axis=1)
  out = jax.vmap(lambda f, o, p: f.at[o].set(f[p]))(flat, order, perm)
  return out.reshape(x.shape)


# ----------------------------------------------------------------------------------- forward
def forward(model, cfg: losses.LossConfig, params, batch_stats, batch, keys, *, train: bool):
  """Everything the enabled loss terms need, from one forward pass (plus x~ for ActDiff).

  `keys`: one PRNG key per sample (used by ActDiff's permutation only).
  Returns (outputs, new_batch_stats); outputs has 'logits' and, as needed, 'maps' (2, N, h, w),
  'input_grads' {term: dx}, 'pooled' and 'pooled_tilde'.
  """
  x = masked_input(batch, cfg.mask_dilation) if cfg.mask_input else batch["image"]
  variables = {"params": params, "batch_stats": batch_stats}

  def features(inp):
    if train:
      a, upd = model.apply(variables, inp, train=True, method="features", mutable=["batch_stats"])
      return a, upd["batch_stats"]
    return model.apply(variables, inp, train=False, method="features"), batch_stats

  if cfg.input_grad_terms:
    a, vjp_x, new_stats = jax.vjp(features, x, has_aux=True)
  else:
    a, new_stats = features(x)
  logits, vjp_head = jax.vjp(lambda f: model.apply({"params": params}, f, method="head"), a)
  outputs = {"logits": logits}
  if cfg.needs_cams:
    outputs["maps"] = cams.maps_from_vjp(vjp_head, logits, a, cfg.cam_kind, cfg.cam_relu)
  if cfg.input_grad_terms:
    outputs["input_grads"] = {
      name: vjp_x(vjp_head(losses.input_grad_cotangent(name, logits))[0])[0]
      for name in cfg.input_grad_terms
    }
  if cfg.needs_actdiff:
    x_tilde = jax.lax.stop_gradient(permute_outside(x, human_mask(batch), keys))
    outputs["pooled"] = jnp.mean(a, axis=(1, 2))
    outputs["pooled_tilde"] = jnp.mean(features(x_tilde)[0], axis=(1, 2))
  return outputs, new_stats


def scores_from_logits(logits):
  """Attack score = P(class 1) (higher = attack / positive class)."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits[:, 0])
  return jax.nn.softmax(logits, axis=-1)[:, 1]


# ------------------------------------------------------------------------------------- steps
def sample_keys(state: TrainState, n: int):
  """One PRNG key per local row, from (state.rng, step, GLOBAL row index): independent of how
  the batch is sharded."""
  if state.rng is None:
    raise ValueError(
      "TrainState.rng is None but a loss term needs randomness (actdiff): "
      "create the state with train.create_state"
    )
  first = jax.lax.axis_index(AXIS) * n  # global index of this device's first row
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(n))


def make_train_step(model, cfg: losses.LossConfig, tx: optax.GradientTransformation, mesh):
  """jit(shard_map(step)): (state, batch) -> (state, metrics); the state is donated."""

  def step(state: TrainState, batch):
    keys = sample_keys(state, batch["label"].shape[0]) if cfg.needs_actdiff else None

    def loss_fn(params):
      outputs, new_stats = forward(model, cfg, params, state.batch_stats, batch, keys, train=True)
      loss, parts = losses.combine(outputs, batch, cfg, axis_name=AXIS)
      return loss, (parts, new_stats, outputs["logits"])

    (_, (parts, new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    valid = batch["valid"]
    correct = (losses.predicted_class(logits) == batch["label"]).astype(jnp.float32)
    metrics = {f"loss/{k}": v for k, v in parts.items()}
    metrics["loss"] = sum(lam * parts[name] for name, lam in cfg.weights)
    metrics["accuracy"] = jax.lax.psum(jnp.sum(correct * valid), AXIS) / jax.lax.psum(
      jnp.sum(valid), AXIS
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    # 1.0 iff the loss and the updated parameters are finite: the loop never saves a bad state.
    metrics["finite"] = jnp.logical_and(
      jnp.isfinite(metrics["loss"]),
      jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])),
    ).astype(jnp.float32)
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    return new_state, metrics

  mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  rep = replicated(mesh)
  # Explicit shardings keep the state's sharding identical across steps (one compilation).
  return jax.jit(
    mapped, in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep), donate_argnums=0
  )


def make_eval_step(model, cfg: losses.LossConfig, mesh):
  """jit(shard_map(step)): (state, batch) -> per-example outputs, sharded over 'data'.

  Outputs: score (P(class 1)), pred, logits, ce (per-example cross-entropy), maps (2, N, h, w)
  raw class maps (class 0, class 1), valid.
  """

  def step(state: TrainState, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    a = model.apply(variables, batch["image"], train=False, method="features")
    logits, maps = cams.class_maps(
      lambda f: model.apply({"params": state.params}, f, method="head"),
      a,
      cfg.cam_kind,
      cfg.cam_relu,
    )
    ce, _ = losses.ce({"logits": logits}, batch, losses.LossConfig())
    return {
      "score": scores_from_logits(logits),
      "pred": losses.predicted_class(logits),
      "logits": logits,
      "ce": ce,
      "maps": jnp.moveaxis(maps, 0, 1),
      "valid": batch["valid"],
    }

  mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
  return jax.jit(
    mapped,
    in_shardings=(replicated(mesh), batch_sharding(mesh)),
    out_shardings=batch_sharding(mesh),
  )
