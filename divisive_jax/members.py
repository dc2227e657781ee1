"""The members of a training job: one run, or a population of seeds x loss-weight settings.

Without ``config.population`` the job has one member, the run itself, whose workdir is the job's.
``config.population.seeds = "0,1,2"`` and ``config.population.weights = "rrr=1,10;gradmask=0.1"``
(``term=values``, terms separated by ';') give one member per seed and per setting of the
product, each in ``<workdir>/members/<name>/``. Each member is an ordinary run of its own config:
the population config with that seed and those weights, the population fields cleared, and --
with host data -- the training order of the population (``data.shuffle_seed``), so that a
member's ``config.json`` trained alone reproduces it. Weights are exact: a value is written
(`weight_text`) as the shortest text that reads back as the same number, in names too.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re

from divisive_jax import config_base, layout, losses
from divisive_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  seed: int
  weights: tuple[tuple[str, float], ...]  # loss.weights overrides
  config: object  # the member as an ordinary run


def parse_seeds(text: str, field: str = "config.population.seeds") -> list[int]:
  """'0,1,2' -> [0, 1, 2]; '' -> []. An empty or non-integer entry, or a seed given twice, is
  an error naming ``field`` and the fix."""
  text = str(text).replace(" ", "")
  if not text:
    return []
  parts = text.split(",")
  if not all(re.fullmatch(r"-?\d+", p) for p in parts):
    raise ConfigError(f"{field}={text!r}: give integer seeds separated by commas, like 0,1,2")
  seeds = [int(p) for p in parts]
  if len(set(seeds)) < len(seeds):
    raise ConfigError(f"{field}={text!r} names a seed twice; give each seed once")
  return seeds


def parse_grid(text: str, field: str = "config.population.weights") -> list[dict[str, float]]:
  """'rrr=1,10;gradmask=0.1,1' -> the product of the settings, [{'rrr': 1, 'gradmask': 0.1}, ...].

  Every value must be a finite number >= 0, each term and each of its values given once; else an
  error naming ``field``, the term and the fix (nothing is dropped)."""
  axes, seen = [], set()
  for part in filter(None, (p.strip() for p in str(text).split(";"))):
    term, sep, values = (x.strip() for x in part.partition("="))
    if not sep or term not in losses.TERMS:
      raise ConfigError(
        f"{field}: {part!r} is not term=v1,v2,... with a term of {', '.join(losses.TERMS)}"
      )
    if term in seen:
      raise ConfigError(f"{field} names {term} twice; give all its values once: {term}=v1,v2,...")
    seen.add(term)
    try:
      numbers = [float(v) for v in values.split(",")]
    except ValueError:
      numbers = []
    if not numbers or not all(math.isfinite(v) and v >= 0 for v in numbers):
      raise ConfigError(
        f"{field}: the values of {term} ({values!r}) must be finite numbers >= 0 separated by "
        f"commas, none empty, like {term}=0.1,1,10"
      )
    if len(set(numbers)) < len(numbers):
      raise ConfigError(f"{field}: {term} has a value twice ({values!r}); give each value once")
    axes.append([(term, v) for v in numbers])
  return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def weight_text(w: float) -> str:
  """A weight as the shortest text that reads back as exactly ``w``: '0.1', '1e+38',
  '0.1234567' (never rounded: two weights never share a text)."""
  short = f"{w:g}"
  return short if float(short) == w else repr(float(w))


def grid_text(settings) -> str:
  """The ``config.population.weights`` text of weight settings ([{term: value}] of one grid)."""
  axes: dict[str, list] = {}
  for setting in settings:
    for t, w in setting.items():
      axes.setdefault(t, []).append(w)
  return ";".join(
    f"{t}={','.join(weight_text(w) for w in sorted(set(v)))}" for t, v in sorted(axes.items())
  )


def setting_name(weights: dict) -> str:
  """'rrr0.1_gradmask1': a weight setting in names (exact, `weight_text`)."""
  return "_".join(f"{t}{weight_text(w)}" for t, w in sorted(weights.items()))


def member_name(seed: int, weights: dict) -> str:
  return "_".join(filter(None, [f"s{seed}", setting_name(weights)]))


def members_of(config) -> list[Member]:
  """The members of ``config``'s job: the run itself, or the population's (see module doc)."""
  if not layout.is_population(config):
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
  if not layout.is_population(config):
    return [workdir]
  return [layout.member_dir(workdir, m.name) for m in members]


def result(member: Member, ev: dict, selection: dict) -> dict:
  """A member's summary (``result.json``): its settings and status, how its checkpoint was
  chosen (``selection``, `loop.Best.selection`), the validation figures of that checkpoint and
  the test figures there. ``best_step`` is the checkpoint's step, ``trained_step`` the step of
  the state it holds (earlier for a member frozen before it)."""
  val, test = ev["val"], ev["test"]
  align = test.get("saliency_alignment", {}).get("true_class", {})
  return {
    "member": member.name,
    "seed": member.seed,
    "weights": dict(member.weights),
    "status": val["status"],
    "best_step": val["checkpoint_step"],
    "trained_step": val["trained_step"],
    "selection": selection,
    "val_auroc": val["auroc"],
    "val_accuracy": val["accuracy_at_0.5"],
    "val_loss": val["mean_cross_entropy"],
    "test_auroc": test["auroc"],
    "test_accuracy": test["accuracy_at_0.5"],
    "test_alignment_pe": align.get("proportional_energy", {}).get("mean"),
  }


def table(results: dict) -> str:
  """The members' results (`result`, by name) as the console table that closes a population:
  each member's status, chosen step and validation / test AUROC there."""
  rows = [("member", "status", "best step", "val AUROC", "test AUROC")]
  for name, r in results.items():
    status = layout.Status.of(r)
    state = "trained" if status.live else f"{status.state.replace('_', ' ')} at step {status.step}"
    rows.append(
      (name, state, str(r["best_step"]), f"{r['val_auroc']:.3f}", f"{r['test_auroc']:.3f}")
    )
  widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  return f"The population's {len(results)} members:\n" + "\n".join(lines)
