"""Where a training job resumes: every member at one step, from checkpoints it can read.

`plan` reads the members' checkpoints from the file system (nothing is written before the job's
checks pass). The job resumes from the newest step every member has -- after a kill while the
members saved, the step before, which each keeps -- and so continues bit-identically.

A member without that step (its folder or checkpoints deleted, all of them damaged, or its
catching up interrupted) is first trained again, from its own newest checkpoint or from scratch,
up to the newest step of the others, in a job of its own (`train.Job` with ``until``): a member
trains the same alone as in its population, to float rounding. A member that the workdir's
stored config does not name (a population grown in place) is refused. A checkpoint whose files
cannot be read is moved to ``<member>/damaged_checkpoints/`` (named in a warning; nothing is
deleted) and the plan is made again without it.
"""

from __future__ import annotations

import dataclasses

from absl import logging

from divisive_jax import checkpoints, config_base, layout, loop, sharding
from divisive_jax import members as members_lib
from divisive_jax import state as state_lib
from divisive_jax import step as step_lib
from divisive_jax.errors import DamagedCheckpointError, WorkdirError


@dataclasses.dataclass(frozen=True)
class Plan:
  step: int | None  # where every member resumes; None: the job starts from scratch
  behind: dict  # {start step (0: from scratch): [member index]}: trained up to ``step`` first


def plan(workdir: str, members, dirs: list[str]) -> Plan:
  """The step the job resumes from and the members that must catch up to it (module doc)."""
  have = [checkpoints.saved_steps(d) for d in dirs]
  if not any(have):
    return Plan(None, {})
  missing = [m.name for m, h in zip(members, have) if not h]
  if missing:
    stored = {m.name for m in members_lib.members_of(config_base.load(workdir))}
    if added := [name for name in missing if name not in stored]:
      raise WorkdirError(
        f"{workdir} holds a trained population without member(s) {', '.join(added)}: a trained "
        "population does not grow in place; train the new members in a new workdir"
      )
  common = set.intersection(*map(set, have))
  if common:
    return Plan(max(common), {})
  step, behind = max(max(h) for h in have if h), {}
  for i, h in enumerate(have):
    if step not in h:
      behind.setdefault(max(h, default=0), []).append(i)
  return Plan(step, behind)


def restore(workdir: str, records, state, mesh, catch_up) -> tuple[int | None, object]:
  """Every member (`loop.Record`) restored at the planned step into ``state`` (a fresh state
  of all members; each member's best evaluation and status into its record): (the step, the
  state), or (None, ``state``) to start from scratch. ``catch_up(indices, start, states, metas,
  until)`` trains members that are behind up to ``until`` (their checkpoints there written;
  with ``start`` 0, from scratch: ``states`` None and ``metas`` Nones)."""
  members = [r.member for r in records]
  targets = step_lib.split_members(state, len(records))
  while True:
    p = plan(workdir, members, [r.workdir for r in records])
    if p.step is None:
      return None, state
    behind = {i for group in p.behind.values() for i in group}
    try:
      if behind:  # the step must be readable before members train towards it
        _read(records, [i for i in range(len(records)) if i not in behind], p.step, targets)
      for start, group in p.behind.items():
        restored = _read(records, group, start, targets) if start else {}
        states = [restored[i][0] for i in group] if start else None
        metas = [restored[i][1] if start else None for i in group]
        catch_up(group, start, states, metas, p.step)
        for i in group:
          records[i].ckpts.reload()
      out = _read(records, range(len(records)), p.step, targets)
    except DamagedCheckpointError as e:
      r = records[e.member]
      logging.warning(f"{e}; moved to {r.ckpts.set_aside(e.step)}: resuming from an older step")
      continue
    for r in records:
      if newer := r.ckpts.discard_after(p.step):  # a kill while the members saved: redone
        logging.info(f"Member {r.member.name}: checkpoint(s) {newer} after step {p.step} redone")
    for r, (_, meta) in zip(records, out.values()):
      r.best, r.status = loop.Best.of(meta), layout.Status.of(meta)
    state = step_lib.join_members([s for s, _ in out.values()], sharding.replicated(mesh))
    return p.step, state_lib.freeze(state, [not r.status.live for r in records], mesh)


def _read(records, indices, step: int, targets) -> dict:
  """{i: (state, meta)} of members ``indices`` at ``step``; a damaged checkpoint raises
  `DamagedCheckpointError` with the member's index as ``member``."""
  out = {}
  for i in indices:
    try:
      out[i] = records[i].ckpts.restore(step, targets[i])
    except DamagedCheckpointError as e:
      e.member = i
      raise
  return out
