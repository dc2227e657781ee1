"""Train and eval steps of one run or of N runs: `jax.jit` of a `jax.shard_map` over the mesh.

The state is replicated (`P()`), batches are split along the batch axes (`P(AXIS)`: every device,
`sharding`). Inside the map each device computes its share of the global weighted-mean loss
(`losses.combine` sums the denominators over the axes) and BatchNorm statistics are synchronised
over the model's `bn_axis_name` (`sharding.BN_AXIS`: a group of devices, all by default).
Gradients of the replicated parameters are summed over the axes by the transpose of an explicit
`pcast` of the float32 parameters to varying (`_varying`): left implicit, shard_map inserts it
where a parameter first meets the batch, after its cast to the compute dtype, and under
bfloat16 compute the gradients were all-reduced in bfloat16 (found compiling for a TPU pod:
RESULTS §10). So every device applies the same update and 1 device and N devices follow the
same trajectory. The state is donated.

One forward pass serves every loss term: `forward` asks the enabled terms what they need
(`losses.Term.needs`): the head's vjp gives the logits and both class CAMs (`cams`);
input-gradient terms reuse the backbone's vjp with their own cotangent; ActDiff adds one forward
pass of x~. The loss weights are runtime values of the state (`state.TrainState.loss_weights`),
like the seed (`TrainState.rng`): one compilation serves every seed and every weight.

Liveness (``guard``, a population's steps: the trainer sets it by the job's kind). The state
carries ``live`` (bool): a step whose loss or updated parameters are not finite, or of a state
that is not live, keeps the state it started from and clears ``live`` (``metrics['live']``): the
member is frozen at its last finite state, decided on the device, so the loop can fetch a step's
metrics after dispatching the next. A run's step has no guard (a run stops on a non-finite
step; its last good checkpoint is intact): the select over the whole state it saves cost 8% of
a tiny-model step on CPU (`benchmarks/population.py --members 1 --against`).

Members. Every factory takes ``members`` (the runs of a population, `divisive_jax.members`):
``members=1`` is the program of one run, the state without a member axis. With ``members=P > 1``
every leaf of the state has a leading member axis and the per-member body, the same function, is
applied over the members by `over_members` (``vmap`` on accelerators, ``unroll`` on CPU).
`split_members` / `join_members` are the one place that knows that one member has no member
axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from divisive_jax import cams, losses, models, preprocess
from divisive_jax.maps import MASK_THRESHOLD
from divisive_jax.preprocess import InputConfig
from divisive_jax.sharding import AXIS, BN_GROUPS

MEMBER_STRATEGIES = ("auto", "vmap", "unroll")


# --------------------------------------------------------------------------- input transforms
def human_mask(batch, threshold: float = MASK_THRESHOLD):
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

  `keys`: one PRNG key per sample (used by terms needing ``pooled_tilde`` only).
  Returns (outputs, new_batch_stats); outputs has 'logits' and, as the terms need, 'maps'
  (2, N, h, w), 'input_grads' {term: dx}, 'pooled' and 'pooled_tilde'.
  """
  needs = cfg.needs
  x = masked_input(batch, cfg.mask_dilation) if cfg.mask_input else batch["image"]
  variables = {"params": params, "batch_stats": batch_stats}

  def features(inp):
    if train:
      a, upd = model.apply(variables, inp, train=True, method="features", mutable=["batch_stats"])
      return a, upd.get("batch_stats", {})  # a ViT has none
    return model.apply(variables, inp, train=False, method="features"), batch_stats

  if "input_grad" in needs:
    a, vjp_x, new_stats = jax.vjp(features, x, has_aux=True)
  else:
    a, new_stats = features(x)
  logits, vjp_head = jax.vjp(lambda f: model.apply({"params": params}, f, method="head"), a)
  outputs = {"logits": logits}
  if "maps" in needs:
    outputs["maps"] = cams.maps_from_vjp(vjp_head, logits, a, cfg.cam_kind, cfg.cam_relu)
  if "input_grad" in needs:
    outputs["input_grads"] = {
      name: vjp_x(vjp_head(losses.input_grad_cotangent(name, logits))[0])[0]
      for name in cfg.terms_needing("input_grad")
    }
  if "pooled_tilde" in needs:
    x_tilde = jax.lax.stop_gradient(permute_outside(x, human_mask(batch), keys))
    outputs["pooled"] = jnp.mean(models.grid(a), axis=(1, 2))
    outputs["pooled_tilde"] = jnp.mean(models.grid(features(x_tilde)[0]), axis=(1, 2))
  return outputs, new_stats


def scores_from_logits(logits):
  """Attack score = P(class 1) (higher = attack / positive class)."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits[:, 0])
  return jax.nn.softmax(logits, axis=-1)[:, 1]


# ------------------------------------------------------------------------------------- steps
def _first_row(n: int):
  return jax.lax.axis_index(AXIS) * n  # global index of this device's first row


def _unroll_scan() -> bool:
  """Unroll the k-step scan on the CPU backend: inside a rolled loop XLA:CPU leaves the
  weight-gradient convolutions in a layout it runs 12-25x slower (measured with the tiny model
  and the difference loss: 210 ms vs 27 ms a step at 64 px); GPUs and TPUs keep the loop."""
  return jax.default_backend() == "cpu"


def _train_step_fn(model, cfg: losses.LossConfig, tx, inputs: InputConfig, guard: bool = False):
  """The per-device body of one run's training step: (state, local batch) -> (state, metrics);
  ``guard``: frozen at the last finite state (module docstring)."""

  def step(state, batch):
    n = batch["label"].shape[0]
    aug_keys = None
    if inputs.augments:
      aug_keys = preprocess.row_keys(
        state.rng, state.step, _first_row(n), n, stream=preprocess.AUGMENT_STREAM
      )
    batch = preprocess.prepare(batch, inputs, aug_keys)
    keys = None  # ActDiff's: one per row from (seed, step, GLOBAL row), however it is sharded
    if "pooled_tilde" in cfg.needs:
      keys = preprocess.row_keys(state.rng, state.step, _first_row(n), n, stream=0)
    weights = state.loss_weights

    def loss_fn(params):
      params = _varying(params)  # gradients summed over the devices in float32
      outputs, new_stats = forward(model, cfg, params, state.batch_stats, batch, keys, train=True)
      loss, parts = losses.combine(outputs, batch, cfg, axis_name=AXIS, weights=weights)
      return loss, (parts, new_stats, outputs["logits"])

    (_, (parts, new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # BatchNorm in groups (`sharding`): one running average for all of them (a group of all
    # devices, the default: a mean over one group, exact, which XLA drops).
    new_stats = jax.lax.pmean(new_stats, BN_GROUPS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    valid = batch["valid"]
    correct = (losses.predicted_class(logits) == batch["label"]).astype(jnp.float32)
    metrics = {f"loss/{k}": v for k, v in parts.items()}
    metrics["loss"] = sum(weights[name] * parts[name] for name in cfg.names)
    metrics["accuracy"] = jax.lax.psum(jnp.sum(correct * valid), AXIS) / jax.lax.psum(
      jnp.sum(valid), AXIS
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    # The loss and the updated parameters finite: else the state stays as it was (frozen).
    finite = jnp.logical_and(
      jnp.isfinite(metrics["loss"]),
      jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])),
    )
    metrics["finite"] = finite.astype(jnp.float32)
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    if not guard or state.live is None:  # a run's step; a hand-made state without liveness
      return new_state, metrics
    keep = jnp.logical_and(state.live, finite)
    new_state = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_state, state)
    metrics["live"] = keep
    return new_state.replace(live=keep), metrics

  return step


def _varying(tree):
  """``tree`` (replicated) marked varying over the batch axes, in its own dtype: the transpose,
  summing the gradients over the devices, then runs on them in that dtype."""
  return jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to="varying"), tree)


def over_members(fn, strategy: str = "auto", shared=(1,)):
  """``fn`` applied to every member: its first argument has a leading member axis, so do the
  other arguments except those in ``shared`` (taken whole by every member).

  ``vmap``: one batched computation (convolutions batched over the members) -- what fills a GPU
  or TPU. ``unroll``: the members' computations one after another in the same program --
  on XLA:CPU the batched convolutions of ``vmap`` run about 4x slower than the members one by one
  (measured: tiny model, 64 px, 4 members: 3.2 s vs 0.85 s a step), while the unrolled program
  runs 1.1x faster than separate dispatches. ``auto``: ``unroll`` on CPU, ``vmap`` elsewhere.
  """
  if strategy == "auto":
    strategy = "unroll" if jax.default_backend() == "cpu" else "vmap"
  if strategy not in MEMBER_STRATEGIES:
    raise ValueError(f"member strategy {strategy!r}; valid: {', '.join(MEMBER_STRATEGIES)}")
  if strategy == "vmap":

    def vmapped(*args):
      axes = tuple(None if i in shared else 0 for i in range(len(args)))
      return jax.vmap(fn, in_axes=axes)(*args)

    return vmapped

  def unrolled(*args):
    n = jax.tree.leaves(args[0])[0].shape[0]
    outs = [
      fn(*[a if i in shared else jax.tree.map(lambda x, m=m: x[m], a) for i, a in enumerate(args)])
      for m in range(n)
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def _members_body(model, cfg, tx, inputs, members, strategy, shared_batch, guard):
  """The per-device train body of ``members`` runs: one run's step, or the same step over a
  leading member axis (every member the same batch when ``shared_batch``)."""
  step = _train_step_fn(model, cfg, tx, inputs, guard)
  if members == 1:
    return step
  return over_members(step, strategy, shared=(1,) if shared_batch else ())


def split_members(tree, n: int) -> list:
  """The ``n`` members of a tree with a leading member axis; ONE member has no member axis, so
  its tree is returned whole. Device trees are split by one compiled program."""
  if n == 1:
    return [tree]
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):
    return _unstack(tree, n)
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def join_members(trees, sharding=None, stack=None):
  """The inverse of `split_members`: trees of equal structure stacked on a new leading member
  axis (one compiled program; ``stack``: another stacking function, e.g. ``np.stack``), or the
  one tree of one member; ``sharding``: where the result is put."""
  trees = list(trees)
  if len(trees) == 1:
    out = trees[0]
  elif stack is None:
    out = _stack(trees)
  else:
    out = jax.tree.map(lambda *xs: stack(xs), *trees)
  return out if sharding is None else jax.device_put(out, sharding)


_stack = jax.jit(lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees))
_unstack = jax.jit(
  lambda tree, n: [jax.tree.map(lambda x: x[i], tree) for i in range(n)], static_argnums=1
)


def make_train_step(
  model,
  cfg: losses.LossConfig,
  tx: optax.GradientTransformation,
  mesh,
  inputs=InputConfig(),
  members: int = 1,
  strategy: str = "auto",
  resident: bool = False,
  guard: bool | None = None,
):
  """The train step: jit(shard_map(step)), the state donated; ``guard`` (default: with several
  members): the liveness guard (module docstring).

  * ``(state, batch) -> (state, metrics)``: ``batch`` holds global arrays sharded over
    'data' (`sharding.to_global`), images and maps uint8 (or float), preprocessed on the device
    (`preprocess`); every member takes the same batch.
  * ``resident=True``: k steps per dispatch on a device-resident training set (`lax.scan`),
    ``(state, dataset, indices) -> (state, metrics)``: ``dataset`` is the whole
    training split replicated on every device (`sharding.replicated`; keys ``image``,
    ``saliency``, ``label``, ``has_saliency``) and ``indices`` int32 the source indices of k
    global batches (`data.pipeline.batch_indices`), (k, B) -- or (k, P, B), each member its own
    batches -- sharded over 'data' along B. Metrics come back stacked, (k,) or (k, P) each. The
    same per-device step runs k times, so k steps per dispatch equal k single steps.

  ``members > 1``: the state has a leading member axis, metrics (P,) each (module docstring).
  """
  guard = members > 1 if guard is None else guard
  body = _members_body(model, cfg, tx, inputs, members, strategy, not resident, guard)
  if not resident:
    return _jit(body, mesh, (P(), P(AXIS)), (P(), P()), donate=True)

  def steps(state, dataset, indices):
    def one(s, idx):
      batch = {k: v[idx] for k, v in dataset.items()}
      batch["valid"] = jnp.ones(idx.shape, jnp.float32)
      return body(s, batch)

    return jax.lax.scan(one, state, indices, unroll=_unroll_scan())

  indices = P(*(None,) * (1 if members == 1 else 2), AXIS)
  return _jit(steps, mesh, (P(), P(), indices), (P(), P()), donate=True)


def _eval_step_fn(model, cam_kind: str, cam_relu: bool, inputs: InputConfig):
  """The per-device body of the eval step: (variables, local batch) -> per-example outputs."""

  def step(variables, batch):
    params, stats = _params_and_stats(variables)
    batch = preprocess.prepare(batch, inputs)
    a = model.apply({"params": params, "batch_stats": stats}, batch["image"], method="features")
    logits, maps = cams.class_maps(
      lambda f: model.apply({"params": params}, f, method="head"), a, cam_kind, cam_relu
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

  return step


def make_eval_step(
  model,
  mesh,
  cam_kind: str = "cam",
  cam_relu: bool = False,
  inputs=InputConfig(),
  members: int = 1,
  strategy: str = "auto",
):
  """jit(shard_map(step)): (variables, batch) -> per-example outputs, sharded over 'data'.

  ``variables``: {'params', 'batch_stats'} (a TrainState also works: only those two are read).
  Batches as for `make_train_step` (preprocessed on the device, without augmentation).
  Outputs: score (P(class 1)), pred, logits, ce (per-example cross-entropy), maps (N, 2, h, w)
  raw class maps (class 0, class 1) of kind ``cam_kind``, valid. ``members > 1``: variables with
  a leading member axis, every output (P, N, ...); the batch is shared.
  """
  step = _eval_step_fn(model, cam_kind, cam_relu, inputs)
  out = P(AXIS)
  if members > 1:
    step, out = over_members(step, strategy, shared=(1,)), P(None, AXIS)
  return _jit(step, mesh, (P(), P(AXIS)), out, donate=False)


def _jit(fn, mesh, in_specs, out_specs, donate: bool):
  """jit(shard_map(fn)) with the shardings of its specs (so a state keeps one sharding across
  steps: one compilation); ``donate``: the first argument (the state) is donated."""

  def shardings(specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  return jax.jit(
    mapped,
    in_shardings=shardings(in_specs),
    out_shardings=shardings(out_specs),
    donate_argnums=0 if donate else (),
  )


def _params_and_stats(variables):
  if isinstance(variables, dict):
    return variables["params"], variables["batch_stats"]
  return variables.params, variables.batch_stats
