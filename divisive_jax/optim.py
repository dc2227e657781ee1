"""Optimisers and learning-rate schedules from `config.optim` (optax).

* `sgd`: SGD + momentum with L2 weight decay added to the gradient before momentum, as in
  PyTorch's `torch.optim.SGD(weight_decay=...)` (the CYBORG recipe: lr 0.005, momentum 0.9,
  weight decay 1e-6, lr x0.1 every 12 epochs).
* `adamw`: decoupled weight decay.

Schedules: `step` (lr * decay_factor ** floor(epoch / decay_every_epochs)), `cosine` (linear
warm-up for `warmup_epochs`, then cosine to 0), `constant`.
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")


def make_schedule(optim_config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  lr = float(optim_config.lr)
  kind = optim_config.get("schedule", "constant")
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "step":
    every = max(1, int(round(float(optim_config.decay_every_epochs) * steps_per_epoch)))
    return optax.exponential_decay(
      lr, transition_steps=every, decay_rate=float(optim_config.decay_factor), staircase=True
    )
  if kind == "cosine":
    warmup = int(round(float(optim_config.get("warmup_epochs", 0.0)) * steps_per_epoch))
    if warmup == 0:
      return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
    )
  raise ValueError(f"config.optim.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")


def make_optimizer(optim_config, steps_per_epoch: int, total_steps: int):
  """Returns (tx, schedule)."""
  schedule = make_schedule(optim_config, steps_per_epoch, total_steps)
  name = optim_config.name
  wd = float(optim_config.get("weight_decay", 0.0))
  if name == "sgd":
    tx = optax.chain(
      optax.add_decayed_weights(wd),
      optax.sgd(schedule, momentum=float(optim_config.get("momentum", 0.0))),
    )
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd)
  else:
    raise ValueError(f"config.optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
  return tx, schedule
