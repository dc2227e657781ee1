"""The train state and the model, optimiser and loss a config describes.

* `TrainState`: what a step updates (step, parameters, BatchNorm statistics, optimiser state)
  and its runtime constants (the PRNG key data and the loss weights).
* `build(config, steps_per_epoch, total_steps, class_weights)` -> `Setup`: the model (BatchNorm
  synchronised over the data axis), the optimiser and its schedule, the static `LossConfig`
  and the mesh. Nothing is computed on devices.
* `create_state(setup, seed, pretrained)` -> a fresh replicated `TrainState` (optionally with
  pretrained backbone weights, already read and checked: `models.torchvision`);
  `create_states(setup, seeds, weights, pretrained)`: the states of a population's members (a
  leading member axis; one member: `create_state`'s state, no member axis).
* `abstract_state(setup)` -> the same state as ShapeDtypeStructs with shardings (restore target).
* `abstract_variables(config, mesh)` -> (model, {'params', 'batch_stats'} ShapeDtypeStructs):
  what inference restores -- no optimiser, so evaluation does not depend on ``config.optim``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from divisive_jax import losses, models, optim, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # PRNG key data (uint32) for stochastic loss terms (ActDiff) and augmentation. Runtime data, not
  # a constant of the compiled program, so runs with different seeds share one compilation.
  rng: Any = None
  # {term: float32 scalar}: the weights lambda_t of the enabled loss terms (runtime data too).
  loss_weights: Any = None


def loss_weights(cfg: losses.LossConfig) -> dict:
  """The runtime weights of ``cfg``'s enabled terms, as float32 scalars."""
  return {name: jnp.float32(w) for name, w in cfg.weights}


@dataclasses.dataclass(frozen=True)
class Setup:
  config: Any
  model: Any
  tx: Any
  schedule: Any
  loss_cfg: losses.LossConfig
  mesh: Any


def input_shape(config) -> tuple[int, int, int, int]:
  return (1, int(config.data.image_size), int(config.data.image_size), int(config.data.channels))


def schedule_lengths(config, num_train: int) -> tuple[int, int]:
  """(steps per epoch, total steps) for a training split of ``num_train`` examples."""
  steps_per_epoch = max(1, num_train // int(config.batch_size))
  total = int(config.num_train_steps) or int(config.num_epochs) * steps_per_epoch
  return steps_per_epoch, total


def build(config, steps_per_epoch: int = 1, total_steps: int = 1, class_weights=None) -> Setup:
  model = models.get_model(config.model, bn_axis_name=sharding.AXIS)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch, total_steps)
  loss_cfg = losses.from_config(config.loss, class_weights)
  return Setup(config, model, tx, schedule, loss_cfg, sharding.make_mesh())


def _init_state(model, tx, shape, weights, rng):
  init_key, loss_key = jax.random.split(rng)
  variables = model.init(init_key, jnp.zeros(shape, jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(loss_key),
    loss_weights=weights,
  )


def _init_fn(setup: Setup):
  return functools.partial(
    _init_state,
    setup.model,
    setup.tx,
    input_shape(setup.config),
    loss_weights(setup.loss_cfg),
  )


def abstract_state(setup: Setup):
  """The TrainState as ShapeDtypeStructs with replicated shardings (no computation)."""
  state = jax.eval_shape(_init_fn(setup), jax.random.key(0))
  rep = sharding.replicated(setup.mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state)


def _run_once(fn, *args, out_shardings):
  """``jax.jit(fn)(*args)`` for a program that runs once (an initialisation). On XLA:CPU most of
  its compile time goes to optimising code that runs once: at LLVM level 1 instead of 2 it
  compiles 2-3x faster (measured: tiny 3.0 -> 1.4 s, ResNet-18 4.5 -> 2.2 s, DenseNet-121 14.3
  -> 10.5 s) and gives bit-identical states (checked for those three)."""
  lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
  options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(*args)


def create_state(setup: Setup, seed: int, pretrained: dict | None = None) -> TrainState:
  """A fresh replicated TrainState; ``pretrained``: torchvision variables to start from."""
  rep = sharding.replicated(setup.mesh)
  state = _run_once(_init_fn(setup), jax.random.key(int(seed)), out_shardings=rep)
  if pretrained is not None:
    from divisive_jax.models import torchvision as tv

    variables = tv.load_torchvision_state_dict(
      pretrained,
      setup.config.model,
      {"params": state.params, "batch_stats": state.batch_stats},
    )
    params = jax.device_put(variables["params"], rep)
    state = state.replace(
      params=params,
      batch_stats=jax.device_put(variables["batch_stats"], rep),
      opt_state=jax.jit(setup.tx.init, out_shardings=rep)(params),
    )
    logging.info("Loaded pretrained weights from %s", setup.config.model.pretrained_path)
  return state


def create_states(setup: Setup, seeds, weights, pretrained: dict | None = None):
  """The states of N members: member i from ``seeds[i]`` with loss weights ``weights[i]``
  ({term: value}); ``pretrained`` gives every member the same starting weights. One member: its
  `create_state` state (no member axis; its weights are the setup's). Several: stacked on a
  leading member axis, initialised by ONE compiled program (vmapped over the seeds)."""
  if len(seeds) == 1:
    return create_state(setup, int(seeds[0]), pretrained)
  model, tx, shape = setup.model, setup.tx, input_shape(setup.config)
  stacked = {t: np.asarray([w[t] for w in weights], np.float32) for t in weights[0]}

  def one(seed, w):
    return _init_state(model, tx, shape, w, jax.random.key(seed))

  rep = sharding.replicated(setup.mesh)
  states = _run_once(jax.vmap(one), np.asarray(seeds, np.int32), stacked, out_shardings=rep)
  if pretrained is not None:
    first = create_state(setup, int(seeds[0]), pretrained)
    states = states.replace(
      **{
        k: stack([getattr(first, k)] * len(seeds), rep)
        for k in ("params", "batch_stats", "opt_state")
      }
    )
  return states


def stack(trees, sharding_=None):
  """Trees with equal structure stacked on a new leading (member) axis (one compiled program)."""
  out = _stack(list(trees))
  return out if sharding_ is None else jax.device_put(out, sharding_)


def unstack(tree, n: int) -> list:
  """The ``n`` members of a tree with a leading member axis (one compiled program)."""
  return _unstack(tree, n)


_stack = jax.jit(lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees))
_unstack = jax.jit(
  lambda tree, n: [jax.tree.map(lambda x: x[i], tree) for i in range(n)], static_argnums=1
)


def abstract_variables(config, mesh):
  """(model, {'params', 'batch_stats'} as ShapeDtypeStructs with replicated shardings)."""
  model = models.get_model(config.model, bn_axis_name=sharding.AXIS)
  shape = input_shape(config)
  variables = jax.eval_shape(
    lambda k: model.init(k, jnp.zeros(shape, jnp.float32), train=False), jax.random.key(0)
  )
  rep = sharding.replicated(mesh)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  return model, jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), variables
  )


def feature_grid(config) -> tuple[int, int]:
  """(h, w) of the feature map A for ``config`` (the CAM grid), from shapes alone."""
  model = models.get_model(config.model)
  shape = input_shape(config)
  a = jax.eval_shape(
    lambda k: model.apply(
      model.init(k, jnp.zeros(shape, jnp.float32)), jnp.zeros(shape), method="features"
    ),
    jax.random.key(0),
  )
  return tuple(a.shape[1:3])


def read_pretrained(config, mesh):
  """The pretrained state dict of ``config.model.pretrained_path`` (None without one), read
  and matched against the model's abstract variables: a bad file stops the run before any data
  work or compilation."""
  if not config.model.pretrained_path:
    return None
  from divisive_jax.models import torchvision as tv

  state_dict = tv.read_state_dict(config.model.pretrained_path)
  _, abstract = abstract_variables(config, mesh)
  tv.check_state_dict(state_dict, config.model, abstract)
  return state_dict
