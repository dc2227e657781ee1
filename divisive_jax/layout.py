"""The on-disk layout of an experiment -- a run, a population, a sweep -- and its one owner: every
other module asks here for a path or a kind (whether two configs are the same experiment is
`config_base.unsafe_differences`).

* a **run**: ``config.json``, ``data_info.json``, ``parameters.txt``, ``metrics.jsonl``,
  ``tensorboard/``, ``checkpoints/``, ``data/`` (prepared CSV data), after its final evaluation
  ``eval_<split>.json``, ``scores_<split>.csv``, ``roc_<split>.png`` and ``result.json``; while
  training, ``.lock``; after a config change, ``config_history.jsonl``; checkpoints that could
  not be read, set aside in ``damaged_checkpoints/``;
* a **population**: ``config.json``, ``data_info.json``, ``data/`` and ``members/<name>/``, each
  member an ordinary run;
* a **sweep**: ``sweep_settings.json`` (from its start), ``sweep.json``, ``sweep.md``,
  ``data/`` and ``<method>/<population>/``, each a population.

`Status`: how a run stands -- training, stopped early at a step, diverged at a step -- the one
record of it (in checkpoint metadata, ``result.json`` and ``eval_<split>.json``) that the
trainer, `sweep`, `report` and `evaluate` read.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from divisive_jax import jsonio

CONFIG = "config.json"
DATA_INFO = "data_info.json"
PARAMETERS = "parameters.txt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
DATA = "data"
RESULT = "result.json"
LOCK = ".lock"
CONFIG_HISTORY = "config_history.jsonl"
MEMBERS = "members"
SWEEP_SETTINGS = "sweep_settings.json"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
KINDS = {"run": "a single run", "population": "a population", "sweep": "a sweep"}


def path(workdir: str, name: str) -> str:
  """``<workdir>/<name>`` for one of the names above."""
  return os.path.join(workdir, name)


def eval_file(workdir: str, split: str, kind: str = "eval", suffix: str = ".json") -> str:
  """``eval_<split>.json``; ``kind``/``suffix``: ``scores_<split>.csv`` (and ``.meta.json``, the
  key of the validation-score cache), ``roc_<split>.png``."""
  return os.path.join(workdir, f"{kind}_{split}{suffix}")


def scores_file(workdir: str, split: str, suffix: str = ".csv") -> str:
  return eval_file(workdir, split, "scores", suffix)


def member_dir(root: str, name: str) -> str:
  return os.path.join(root, MEMBERS, name)


def is_population(config) -> bool:
  """Whether a config (a ConfigDict, or its JSON as a dict) describes a population."""
  population = config.get("population") or {}
  return bool(population.get("seeds") or population.get("weights"))


def kind_of(workdir: str) -> str | None:
  """What ``workdir`` holds: 'run', 'population' or 'sweep'; None when it holds no experiment."""
  if any(os.path.exists(path(workdir, f)) for f in (SWEEP_SETTINGS, SWEEP_JSON)):
    return "sweep"
  if os.path.isdir(path(workdir, MEMBERS)):
    return "population"
  if not os.path.exists(path(workdir, CONFIG)):
    return None
  return "population" if is_population(read_config(workdir)) else "run"


def read_config(workdir: str) -> dict:
  """``<workdir>/config.json`` as stored (a damaged one: one line naming it and the fix)."""
  fix = "it records the config the run was trained with: restore it from a copy"
  return jsonio.read_json(path(workdir, CONFIG), fix)


def runs_in(workdir: str) -> list[str]:
  """The runs of a population or sweep root: the member workdirs below it, sorted."""
  found = []
  for pattern in (MEMBERS, f"*/*/{MEMBERS}"):
    found += glob.glob(os.path.join(glob.escape(workdir), pattern, "*", CONFIG))
  return sorted(os.path.dirname(p) for p in found)


def not_one_run(workdir: str) -> str | None:
  """Why ``workdir`` is not one run's workdir (it is a population or sweep root, naming its
  runs), else None: what evaluate, explain and report say instead of 'train first'."""
  kind = kind_of(workdir)
  if kind not in ("population", "sweep"):
    return None
  runs = runs_in(workdir)
  example = runs[0] if runs else member_dir(workdir, "<name>")
  pattern = f"{MEMBERS}/*" if kind == "population" else f"*/*/{MEMBERS}/*"
  return (
    f"{workdir} is {KINDS[kind]} of {len(runs)} runs, not one run: give one of its runs, e.g. "
    f"{example} (all of them: {os.path.join(workdir, pattern)})"
  )


def populations_in(method_dir: str) -> list[str]:
  """The population folders of a sweep's method folder, sorted."""
  pattern = os.path.join(glob.escape(method_dir), "*", CONFIG)
  return sorted(os.path.dirname(p) for p in glob.glob(pattern))


def trained_members(method_dir: str, name: str) -> list[str]:
  """The workdirs of member ``name`` with a ``result.json`` in any population of a method."""
  pattern = os.path.join(glob.escape(method_dir), "*", MEMBERS, name, RESULT)
  return sorted(os.path.dirname(p) for p in glob.glob(pattern))


@dataclasses.dataclass(frozen=True)
class Status:
  """How a member stands: ``live`` (training or trained to the end), ``early_stopped`` at
  ``step`` (its validation figure stopped improving), or ``diverged`` at ``step`` (its loss or
  parameters became non-finite there: it is frozen at its last finite state, that of the step
  before, and its figures are that state's)."""

  state: str = "live"
  step: int | None = None

  @property
  def live(self) -> bool:
    return self.state == "live"

  @property
  def diverged(self) -> bool:
    return self.state == "diverged"

  def to_json(self) -> dict:
    return {"state": self.state, "step": self.step}

  @classmethod
  def of(cls, record: dict) -> "Status":
    """The status in a checkpoint meta, ``result.json`` or ``eval_<split>.json`` record (live
    when it has none). Records written before the status existed said it as text: read once
    here."""
    if isinstance(record.get("status"), dict):
      return cls(str(record["status"]["state"]), record["status"].get("step"))
    legacy = str(record.get("frozen") or "")
    step = re.search(r"at step (\d+)", legacy)
    step = int(step.group(1)) if step else None
    if legacy.startswith("non-finite"):
      return cls("diverged", step)
    if legacy.startswith("early") or record.get("early_stopped"):
      return cls("early_stopped", step)
    return cls()

  def describe(self) -> str:
    """'' for a live member; else the sentence every output uses."""
    if self.diverged:
      last = "" if self.step is None else f" (step {self.step - 1})"
      return (
        f"diverged at step {self.step} (non-finite loss or parameters): its figures are those "
        f"of its last finite state{last}"
      )
    return "" if self.live else f"stopped early at step {self.step}"
