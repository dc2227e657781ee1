r"""Faults a long study meets, injected into a small sweep (issue 28).

An uninterrupted sweep is the reference (3 populations: ``ce`` with seeds 0 and 1 in one program,
``rrr`` at weights 1 and 100 for each seed, at most 2 members a program; 12 steps each, tiny
model, built-in data). Each trial then breaks a sweep in one way -- kill -9, SIGTERM or Ctrl-C at
a random moment (the delays drawn from ``--seed``, recorded), a damaged or deleted checkpoint or
member, damaged JSON, a misspelled or contradictory command, a command on a running sweep --
re-runs the same sweep command (after the fix the one-line message names, for input errors), and
compares every member's ``eval_test.json`` and ``result.json`` and the sweep's ``sweep.json``
with the reference, byte for byte. A retrained member (its folder deleted) is compared as
numbers: equal to float rounding. Every trial also checks that nothing already written was lost
(each file of the broken sweep still there, a damaged checkpoint set aside, not deleted) and that
a refused command changed no file. Prints a table; writes JSON.

  python benchmarks/faults.py --out /tmp/faults --json benchmarks/results/faults.json
  python benchmarks/faults.py --out /tmp/faults2 --only ctrl-c-twice --twice 3 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
  data__num_train=32,
  data__num_val=16,
  data__num_test=16,
  data__image_size=32,
  model__width=4,
  batch_size=16,
  num_train_steps=12,
  eval_every_steps=4,
  log_every_steps=2,
)
OUTPUTS = ("eval_test.json", "result.json", "sweep.json")


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]


def py(module: str, *args) -> list[str]:
  return [sys.executable, "-m", f"divisive_jax.{module}", *args]


def sweep_cmd(w: str, *extra, config="iris_pad.py:quick", grid="rrr=1,100") -> list[str]:
  return py(
    "sweep",
    f"--config={REPO}/configs/{config}",
    f"--workdir={w}",
    "--methods=ce,rrr",
    f"--grid={grid}",
    "--seeds=0,1",
    "--max_population=2",
    *flags(TINY),
    *extra,
  )


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def run(cmd, timeout=900) -> tuple[int, str]:
  p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr


def signal_at(cmd, delay: float, signums) -> tuple[int, str]:
  """Start ``cmd``, send ``signums`` (a list, 0.3 s apart) after ``delay`` seconds."""
  p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    p.wait(delay)
  except subprocess.TimeoutExpired:
    for s in signums:
      p.send_signal(s)
      time.sleep(0.3)
  out, _ = p.communicate(timeout=900)
  return p.returncode, out


def files(w: str) -> dict[str, str]:
  """{relative path: sha256} of every file under ``w``."""
  out = {}
  for root, _, names in os.walk(w):
    for n in names:
      path = os.path.join(root, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, w)] = hashlib.sha256(f.read()).hexdigest()
  return out


def outputs(w: str) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(w):
    for n in names:
      if n in OUTPUTS and "damaged_checkpoints" not in root:
        with open(os.path.join(root, n), "rb") as f:
          out[os.path.relpath(os.path.join(root, n), w)] = f.read()
  return out


def max_rel_diff(a, b) -> float:
  """The largest relative difference of the numbers in two JSON values (inf: other structure)."""
  if isinstance(a, dict) and isinstance(b, dict):
    if a.keys() != b.keys():
      return float("inf")
    return max([max_rel_diff(a[k], b[k]) for k in a] or [0.0])
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return float("inf")
    return max([max_rel_diff(x, y) for x, y in zip(a, b)] or [0.0])
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)
  return 0.0 if a == b else float("inf")


def compare(w: str, reference: dict) -> tuple[str, float]:
  """('bit-identical' | 'equal to rounding' | 'different', the largest relative difference)."""
  got = outputs(w)
  if got == reference:
    return "bit-identical", 0.0
  if got.keys() != reference.keys():
    return "different", float("inf")
  worst = max(max_rel_diff(json.loads(got[k]), json.loads(reference[k])) for k in got)
  return ("equal to rounding" if worst <= 1e-6 else "different"), worst


def one_line_error(rc: int, out: str) -> str | None:
  """The error line of a refused command (exit 1, or 2 for a flag absl rejects; no
  traceback), else None."""
  lines = [x for x in out.strip().splitlines() if x.strip()]
  if rc in (1, 2) and lines and lines[-1].startswith("error: ") and "Traceback" not in out:
    return lines[-1]
  return None


def lost(before: dict, w: str, allowed=()) -> list[str]:
  """Files of ``before`` no longer under ``w`` (checkpoints rotate; ``allowed`` may go)."""
  now = files(w)
  gone = [p for p in before if p not in now and "checkpoints" not in p.split(os.sep)]
  return [p for p in gone if not any(p.startswith(a) for a in allowed)]


class Trials:
  def __init__(self, out: str, seed: int):
    self.out, self.rng, self.rows = out, random.Random(seed), []
    self.ref = os.path.join(out, "reference")
    t = time.time()
    rc, log = run(sweep_cmd(self.ref))
    if rc:
      raise SystemExit(f"the reference sweep failed:\n{log[-3000:]}")
    self.seconds = time.time() - t
    self.reference = outputs(self.ref)
    print(f"reference sweep: {self.seconds:.0f} s, {len(self.reference)} output files", flush=True)

  def fresh(self, name: str, finished: bool) -> str:
    w = os.path.join(self.out, name)
    shutil.rmtree(w, ignore_errors=True)
    if finished:
      shutil.copytree(self.ref, w)
    return w

  def record(self, fault: str, detail: str, w: str, outcome: str, **more) -> None:
    """Re-run the sweep in ``w`` to the end, compare; one row."""
    before = files(w)
    rc, log = run(sweep_cmd(w))
    result, diff = compare(w, self.reference) if rc == 0 else ("re-run failed", float("inf"))
    row = dict(
      fault=fault,
      detail=detail,
      outcome=outcome,
      rerun=result,
      max_rel_diff=diff,
      lost=lost(before, w, more.pop("allowed", ())),
      **more,
    )
    if rc:
      row["rerun_error"] = log.strip().splitlines()[-1] if log.strip() else ""
    self.rows.append(row)
    print(json.dumps(row), flush=True)

  # --- signals -----------------------------------------------------------------------------

  def signal_trial(self, i: int, name: str, signums, expected: int) -> None:
    w = self.fresh(f"{name}_{i}", False)
    delay = round(self.rng.uniform(2.0, 0.95 * self.seconds), 2)
    rc, log = signal_at(sweep_cmd(w), delay, signums)
    last = [x for x in log.strip().splitlines() if x.strip()][-1:] or [""]
    if rc == -signal.SIGKILL:
      outcome = "killed"
    elif rc == 0:
      outcome = "finished before the signal"
    elif rc == expected and "Traceback" not in log:
      outcome = f"exit {rc}, one line: {last[0][:100]}"
    else:
      outcome = f"exit {rc}: {last[0][:100]}"
    self.record(name, f"after {delay} s", w, outcome, delay_s=delay)

  # --- damaged and deleted files -----------------------------------------------------------

  def members(self, w: str) -> list[str]:
    out = []
    for root, dirs, _ in os.walk(w):
      if os.path.basename(root) == "members":
        out += [os.path.join(root, d) for d in sorted(dirs)]
    return sorted(out)

  def damage_checkpoint(self, member: str) -> str:
    steps = sorted(int(d) for d in os.listdir(os.path.join(member, "checkpoints")) if d.isdigit())
    folder = os.path.join(member, "checkpoints", str(steps[-1]), "variables")
    data = [
      os.path.join(r, n)
      for r, _, ns in os.walk(folder)
      for n in ns
      if os.sep + "d" in r and "manifest" not in n
    ]
    target = max(data, key=os.path.getsize)
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 3)
    return os.path.relpath(target, member)

  def killed(self, name: str) -> tuple[str, float]:
    """A sweep killed (-9) at a random moment once some member has a checkpoint."""
    w = self.fresh(name, False)
    delay = round(self.rng.uniform(0.3 * self.seconds, 0.9 * self.seconds), 2)
    signal_at(sweep_cmd(w), delay, [signal.SIGKILL])
    return w, delay

  def damaged_finished(self, i: int) -> None:
    w = self.fresh(f"damaged_{i}", True)
    member = self.rng.choice(self.members(w))
    what = self.damage_checkpoint(member)
    self.record(
      "damaged newest checkpoint (finished sweep)",
      f"{os.path.relpath(member, w)}: {what} cut to a third",
      w,
      "set aside, resumed from an older step",
    )

  def damaged_midway(self) -> None:
    w, delay = self.killed("damaged_midway")
    candidates = [m for m in self.members(w) if os.path.isdir(os.path.join(m, "checkpoints"))]
    candidates = [m for m in candidates if any(d.isdigit() for d in os.listdir(m + "/checkpoints"))]
    if not candidates:
      return self.record("damaged checkpoint after kill -9", f"at {delay} s: none yet", w, "-")
    member = self.rng.choice(candidates)
    what = self.damage_checkpoint(member)
    detail = f"kill -9 at {delay} s, then {os.path.relpath(member, w)}: {what} cut"
    self.record("damaged checkpoint after kill -9", detail, w, "set aside", delay_s=delay)

  def deleted_member(self, i: int, finished: bool) -> None:
    if finished:
      w, detail = self.fresh(f"deleted_member_{i}", True), ""
    else:
      w, delay = self.killed(f"deleted_member_{i}")
      detail = f"kill -9 at {delay} s, then "
    member = self.rng.choice(self.members(w))
    shutil.rmtree(member)
    detail += f"rm -rf {os.path.relpath(member, w)}"
    kind = "finished sweep" if finished else "after kill -9"
    allowed = (os.path.relpath(member, w),)
    self.record(f"member folder deleted ({kind})", detail, w, "retrained", allowed=allowed)

  def damaged_json(self, which: str) -> None:
    """A damaged JSON file: one line naming it and the fix; the fix applied; re-run."""
    w = self.fresh(f"json_{which}", True)
    member = self.rng.choice(self.members(w))
    path = {
      "member config.json": os.path.join(member, "config.json"),
      "member result.json": os.path.join(member, "result.json"),
      "population config.json": os.path.join(
        os.path.dirname(os.path.dirname(member)), "config.json"
      ),
    }[which]
    with open(path) as f:
      original = f.read()
    with open(path, "w") as f:
      f.write(original[: len(original) // 2])
    before = files(w)
    rc, log = run(sweep_cmd(w))
    error = one_line_error(rc, log)
    unchanged = files(w) == before
    named = error is not None and os.path.basename(path) in error
    outcome = (
      f"one line{' naming the file' if named else ''}: {error[:90]}" if error else f"rc {rc}"
    )
    if "result.json" in which:
      os.remove(path)  # the message's fix: the sweep evaluates that member again
    else:
      with open(path, "w") as f:  # the message's fix: restore it from a copy
        f.write(original)
    allowed = (os.path.relpath(path, w),)
    self.record(
      f"damaged {which}", os.path.relpath(path, w), w, outcome, unchanged=unchanged, allowed=allowed
    )

  # --- refused commands --------------------------------------------------------------------

  def refused(self, fault: str, detail: str, cmd_of, finished: bool) -> None:
    """A command that must be refused in one line, changing nothing; then the sweep re-run."""
    w = self.fresh(fault.replace(" ", "_")[:40], finished)
    before = files(w) if os.path.isdir(w) else {}
    rc, log = run(cmd_of(w))
    error = one_line_error(rc, log)
    after = files(w) if os.path.isdir(w) else {}
    outcome = f"one line: {error[:100]}" if error else f"rc {rc}: {log.strip()[-200:]}"
    self.record(fault, detail, w, outcome, unchanged=after == before)

  def evaluate_while_training(self) -> None:
    w = self.fresh("evaluate_while_training", False)
    p = subprocess.Popen(sweep_cmd(w), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    member, t0 = None, time.time()
    while member is None and time.time() - t0 < 600:
      time.sleep(0.5)
      for m in self.members(w):
        ckpt = os.path.join(m, "checkpoints")
        if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
          member = m
          break
    before = files(member)
    rc, log = run(py("evaluate", f"--workdir={member}"))
    error = one_line_error(rc, log)
    p.wait(900)
    wrote = "eval_test.json" in set(files(member)) - set(before)
    outcome = f"one line: {error[:100]}" if error else f"rc {rc}, wrote eval_test.json: {wrote}"
    self.record("evaluate on a training member", os.path.relpath(member, w), w, outcome)

  def report_twice(self) -> None:
    w = self.fresh("report_twice", True)
    other = w + "_copy"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(w, other)
    pattern = "rrr/seeds_0-0/members/*"
    rc, log = run(py("report", os.path.join(w, pattern), os.path.join(other, pattern)))
    error = one_line_error(rc, log)
    outcome = f"one line: {error[:100]}" if error else f"rc {rc}: {log.strip()[-200:]}"
    self.record("report given one population twice", pattern, w, outcome)

  def grown_population(self) -> None:
    w = self.fresh("grown_population", True)
    folder = os.path.join(w, "ce", "seeds_0-1")
    config = os.path.join(folder, "config.json")
    cmd = py(
      "main", f"--config={REPO}/configs/iris_pad.py:quick", f"--workdir={folder}",
      *flags(TINY), "--config.population.seeds=0,1,2", "--config.final_eval=True",
    )  # fmt: skip
    before = files(w)
    rc, log = run(cmd)
    error = one_line_error(rc, log)
    outcome = f"one line: {error[:100]}" if error else f"rc {rc}: {log.strip()[-200:]}"
    self.record("population grown in place", config, w, outcome, unchanged=files(w) == before)


GROUPS = (
  "kill",
  "sigterm",
  "ctrl-c",
  "ctrl-c-twice",
  "damaged",
  "deleted",
  "json",
  "refused",
  "running",
)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", help="scratch folder (emptied); required unless --table")
  ap.add_argument("--json", help="write the trials here")
  ap.add_argument("--seed", type=int, default=0, help="draws the delays and the members hit")
  ap.add_argument("--kills", type=int, default=8, help="kill -9 trials")
  ap.add_argument("--twice", type=int, default=1, help="Ctrl-C twice trials")
  ap.add_argument("--only", default="", help=f"comma list of trial groups: {', '.join(GROUPS)}")
  ap.add_argument("--table", help="only print the table of this JSON (a finished run's)")
  a = ap.parse_args(argv)
  if a.table:
    with open(a.table) as f:
      return print(table(json.load(f)))
  if not a.out:
    ap.error("--out is required")
  shutil.rmtree(a.out, ignore_errors=True)
  os.makedirs(a.out)
  t = Trials(a.out, a.seed)
  only = set(a.only.split(",")) if a.only else set(GROUPS)
  if only - set(GROUPS):
    ap.error(f"--only: {sorted(only - set(GROUPS))} not among {', '.join(GROUPS)}")
  for i in range(a.kills if "kill" in only else 0):
    t.signal_trial(i, "kill -9", [signal.SIGKILL], -9)
  for i in range(3 if "sigterm" in only else 0):
    t.signal_trial(i, "SIGTERM", [signal.SIGTERM], 143)
  for i in range(2 if "ctrl-c" in only else 0):
    t.signal_trial(i, "Ctrl-C", [signal.SIGINT], 130)
  for i in range(a.twice if "ctrl-c-twice" in only else 0):
    t.signal_trial(i, "Ctrl-C twice", [signal.SIGINT, signal.SIGINT], 130)
  if "damaged" in only:
    for i in range(2):
      t.damaged_finished(i)
    t.damaged_midway()
  if "deleted" in only:
    t.deleted_member(0, finished=True)
    t.deleted_member(1, finished=False)
  for which in ("member config.json", "member result.json", "population config.json"):
    if "json" in only:
      t.damaged_json(which)
  for fault, detail, cmd_of in (
    ("misspelled config file", "--config=configs/iris_pda.py:quick",
     lambda w: sweep_cmd(w, config="iris_pda.py:quick")),
    ("a weight given twice", "--grid=rrr=1,100,1", lambda w: sweep_cmd(w, grid="rrr=1,100,1")),
    ("seeds given twice, disagreeing", "--seeds=0,1 --config.population.seeds=0,2",
     lambda w: sweep_cmd(w, "--config.population.seeds=0,2")),
    ("images of 1 x 1 px", "--config.data.image_size=1",
     lambda w: sweep_cmd(w, "--config.data.image_size=1")),
  ):  # fmt: skip
    if "refused" in only:
      t.refused(fault, detail, cmd_of, False)
  if "running" in only:
    t.evaluate_while_training()
    t.report_twice()
    t.grown_population()

  summary = dict(seed=a.seed, reference_seconds=t.seconds, trials=t.rows)
  print(table(summary))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(summary, f, indent=2, default=str)
      f.write("\n")


def table(summary: dict) -> str:
  """The trials as a markdown table, with the counts of re-run outcomes."""
  rows = summary["trials"]
  counts = collections.Counter(r["rerun"] for r in rows)
  lines = [
    f"{len(rows)} trials (seed {summary['seed']}); re-runs: {dict(counts)}",
    "",
    "| fault | injected | first outcome | re-run vs uninterrupted | files lost |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    outcome = (
      "killed"
      if r["fault"] == "kill -9" and r["outcome"] != "finished before the signal"
      else r["outcome"]
    )
    if r.get("unchanged") is not None:
      outcome += "; no file changed" if r["unchanged"] else "; FILES CHANGED"
    lost_text = ", ".join(r["lost"]) or "none"
    lines.append(f"| {r['fault']} | {r['detail']} | {outcome} | {r['rerun']} | {lost_text} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
