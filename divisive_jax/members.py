"""The members of a training job: one run, or a population of seeds x loss-weight settings.

Without ``config.population`` the job has one member, the run itself, whose workdir is the job's.
``config.population.seeds = "0,1,2"`` and ``config.population.weights = "rrr=1,10;gradmask=0.1"``
(``term=values``, terms separated by ';') give one member per seed and per setting of the
product, each in ``<workdir>/members/<name>/``. Each member is an ordinary run of its own config:
the population config with that seed and those weights, the population fields cleared, and --
with host data -- the training order of the population (``data.shuffle_seed``), so that a
member's ``config.json`` trained alone reproduces it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os

from divisive_jax import config_base, losses
from divisive_jax.errors import ConfigError

MEMBERS_DIR = "members"


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  seed: int
  weights: tuple[tuple[str, float], ...]  # loss.weights overrides
  config: object  # the member as an ordinary run


def parse_seeds(text: str) -> list[int]:
  try:
    return [int(s) for s in str(text).replace(" ", "").split(",") if s]
  except ValueError:
    raise ConfigError(f"config.population.seeds={text!r}: use integers like '0,1,2'") from None


def parse_grid(text: str) -> list[dict[str, float]]:
  """'rrr=1,10;gradmask=0.1,1' -> the product of the settings, [{'rrr': 1, 'gradmask': 0.1}, ...]."""
  axes = []
  for part in filter(None, (p.strip() for p in str(text).split(";"))):
    term, sep, values = part.partition("=")
    term = term.strip()
    if not sep or term not in losses.TERMS:
      raise ConfigError(
        f"config.population.weights: {part!r} is not term=v1,v2,... with a term of "
        f"{', '.join(losses.TERMS)}"
      )
    try:
      axes.append([(term, float(v)) for v in values.split(",") if v.strip()])
    except ValueError:
      raise ConfigError(f"config.population.weights: values of {term!r} must be numbers") from None
  return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def member_name(seed: int, weights: dict) -> str:
  return "_".join([f"s{seed}"] + [f"{t}{w:g}" for t, w in sorted(weights.items())])


def is_population(config) -> bool:
  return bool(config.population.seeds or config.population.weights)


def members_of(config) -> list[Member]:
  """The members of ``config``'s job: the run itself, or the population's (see module doc)."""
  if not is_population(config):
    return [Member(str(config.name), int(config.seed), (), config)]
  seeds = parse_seeds(config.population.seeds) or [int(config.seed)]
  out = []
  for weights in parse_grid(config.population.weights):
    for seed in seeds:
      c = copy.deepcopy(config)
      with c.unlocked():
        c.seed = seed
        for t, w in weights.items():
          c.loss.weights[t] = w
        c.population.seeds, c.population.weights = "", ""
        if not c.data.on_device:  # host data: one shared order for the whole population
          c.data.shuffle_seed = config_base.shuffle_seed(config)
        name = member_name(seed, weights)
        c.name = f"{config.name}_{name}"
      try:
        config_base.validate(c)
      except ConfigError as e:
        raise ConfigError(f"population member {name}: {e}") from None
      out.append(Member(name, seed, tuple(sorted(weights.items())), c))
  if len({m.name for m in out}) != len(out):
    raise ConfigError("config.population: two members have the same seed and weights")
  return out


def union_config(config, members):
  """The config whose enabled loss terms are those of any member (their weights are runtime)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for t in losses.TERMS:
      c.loss.weights[t] = max(float(m.config.loss.weights[t]) for m in members)
  return c


def workdirs(config, workdir: str, members) -> list[str]:
  """Each member's workdir: the job's own for one run, ``members/<name>`` in a population."""
  if not is_population(config):
    return [workdir]
  return [os.path.join(workdir, MEMBERS_DIR, m.name) for m in members]


def result(member: Member, ev: dict, frozen: str) -> dict:
  """A member's summary (``result.json``): its settings, the validation figures of its best
  checkpoint and the test figures there."""
  val, test = ev["val"], ev["test"]
  align = test.get("saliency_alignment", {}).get("true_class", {})
  return {
    "member": member.name,
    "seed": member.seed,
    "weights": dict(member.weights),
    "best_step": val["checkpoint_step"],
    "frozen": frozen,
    "val_auroc": val["auroc"],
    "val_accuracy": val["accuracy_at_0.5"],
    "val_loss": val["mean_cross_entropy"],
    "test_auroc": test["auroc"],
    "test_accuracy": test["accuracy_at_0.5"],
    "test_alignment_pe": align.get("proportional_energy", {}).get("mean"),
  }
