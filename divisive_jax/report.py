"""Open-set reporting: aggregate ``eval_test.json`` of many runs by (method, held-out attack).

Each workdir must hold
* ``config.json``: the run's config. Read defensively: held-out attack from
  ``config['data']['heldout_attack']`` (missing/None/'' -> 'none', i.e. closed set; a list is
  joined with '+'), seed from ``config['seed']``, method from ``config['method']`` or, when
  absent, the names of the nonzero terms of ``config['loss']['weights']`` joined with '+'
  (e.g. 'ce+cyborg'), else 'unknown'; runs that diverged (their ``eval_test.json`` status) form
  their own rows, marked '[diverged]'.
* ``eval_test.json``: the :func:`divisive_jax.evaluators.pad.pad_metrics` dict (written by
  ``python -m divisive_jax.evaluate --workdir=W``). Metrics are looked up at the top level,
  then under a 'metrics' or 'pad' sub-dict; null/NaN values are skipped (and the per-metric
  count shows it).

Per group the rows give mean, sample std (ddof=1; None when fewer than 2 finite values) and
count of each metric in :data:`METRICS`. Error rates are fractions (not percent).

CLI::

    python -m divisive_jax.report --out=DIR 'workdirs/*' W2 ...

prints the markdown table and, with ``--out``, writes ``DIR/summary.md`` and
``DIR/summary.json``. Glob patterns are expanded here too (quote them to keep the shell out).
A missing workdir or file is one line naming it and the command that makes it (`cli.run`).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

from divisive_jax import cli, jsonio, layout, metrics
from divisive_jax.errors import ConfigError, MissingFileError

__all__ = ["METRICS", "expand_workdirs", "load_run", "summarize_runs", "main"]

METRICS = ("auroc", "eer", "apcer", "bpcer", "bpcer_at_apcer5", "bpcer_at_apcer1")


def expand_workdirs(patterns: Iterable[str]) -> list[str]:
  """Expand glob patterns (sorted), keep plain paths, drop duplicates (by real path)."""
  out, seen = [], set()
  for p in patterns:
    p = os.fspath(p)
    matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    if not matches:
      raise MissingFileError(f"no workdir matches the pattern {p!r}")
    for m in matches:
      key = os.path.realpath(m)
      if key not in seen:
        seen.add(key)
        out.append(m)
  return out


def _get(d: Any, *keys, default=None):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def _method(config: dict) -> str:
  """The method (told apart from its recipe by the weights that differ: 'rrr (rrr=100)', as
  population members and sweeps train it), else the nonzero terms ('ce+cyborg'), else
  'unknown'."""
  from divisive_jax import losses

  weights = {}
  for k, v in (_get(config, "loss", "weights") or {}).items():
    if not isinstance(v, bool) and isinstance(v, (int, float)):
      weights[str(k)] = float(v)
  m = config.get("method") if isinstance(config, dict) else None
  if m:
    recipe = losses.METHODS.get(str(m), {})
    changed = [f"{k}={v:g}" for k, v in weights.items() if v != float(recipe.get(k, 0.0))]
    return f"{m} ({', '.join(changed)})" if changed else str(m)
  return "+".join(k for k, v in weights.items() if v != 0.0) or "unknown"


def _heldout(config: dict) -> str:
  h = _get(config, "data", "heldout_attack")
  if h is None or h == "" or h == []:
    return "none"
  if isinstance(h, (list, tuple)):
    return "+".join(str(x) for x in h)
  return str(h)


def _float(v) -> float:
  if v is None or isinstance(v, bool):
    return float("nan")
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def load_run(workdir: str) -> dict[str, Any]:
  """Read one workdir -> {'workdir', 'method', 'heldout_attack', 'seed', <METRICS>}."""
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise MissingFileError(f"workdir {workdir!r} does not exist or is not a directory")
  cfg_path = layout.path(workdir, layout.CONFIG)
  eval_path = layout.eval_file(workdir, "test")
  problem = layout.not_one_run(workdir)
  if problem:
    raise MissingFileError(problem)
  if not os.path.isfile(eval_path):
    raise MissingFileError(
      f"{eval_path} not found; create it with: python -m divisive_jax.evaluate --workdir={workdir}"
    )
  if not os.path.isfile(cfg_path):
    raise MissingFileError(
      f"{cfg_path} not found; training writes it when it starts: is {workdir} a training workdir?"
    )
  config = jsonio.read_json(cfg_path)
  ev = jsonio.read_json(
    eval_path, f"re-create it: python -m divisive_jax.evaluate --workdir={workdir}"
  )
  if not isinstance(config, dict):
    config = {}
  sources = [ev] + [
    ev[k] for k in ("metrics", "pad") if isinstance(ev, dict) and isinstance(ev.get(k), dict)
  ]
  diverged = layout.Status.of(ev if isinstance(ev, dict) else {}).diverged
  row = {
    "workdir": workdir,
    "method": _method(config) + (" [diverged]" if diverged else ""),
    "heldout_attack": _heldout(config),
    "seed": config.get("seed"),
  }
  for name in METRICS:
    found = (src[name] for src in sources if isinstance(src, dict) and name in src)
    row[name] = _float(next(found, None))
  return row


def _refuse_repeated_runs(runs: list[dict]) -> None:
  """Two workdirs of the same experiment (the same config and seed, e.g. two populations
  trained alike) would count one seed twice: an error naming both."""
  seen: dict[str, str] = {}
  for r in runs:
    config = jsonio.read_json(layout.path(r["workdir"], layout.CONFIG))
    if not isinstance(config, dict):
      continue
    config.pop("name", None)  # what a run is called and where its data are, not what it trains
    if isinstance(config.get("data"), dict):
      config["data"].pop("data_dir", None)
    key = json.dumps(config, sort_keys=True, default=str)
    if key in seen:
      raise ConfigError(
        f"{seen[key]} and {r['workdir']} are the same run (the same config and seed "
        f"{r['seed']}): give one of them, or report would count that seed twice"
      )
    seen[key] = r["workdir"]


def _cell(mean, std, n, n_runs) -> str:
  if mean is None:
    return "n/a"
  s = f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
  if n != n_runs:
    s += f" (n={n})"
  return s


def _markdown(rows: list[dict]) -> str:
  head = ["method", "held-out attack", "n", "seeds"] + list(METRICS)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    seeds = ", ".join(str(s) for s in r["seeds"] if s is not None) or "-"
    cells = [r["method"], r["heldout_attack"], str(r["n"]), seeds]
    cells += [_cell(r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_n"], r["n"]) for m in METRICS]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  lines.append("")
  lines.append(
    "Mean ± sample std (ddof=1) over runs; error rates are fractions; thresholds "
    "chosen on validation (score: higher = attack); `eer` is the test set's own "
    "EER. (n=k) marks metrics defined for only k runs. [diverged]: runs whose loss or "
    "parameters became non-finite; their figures are those of their last finite state."
  )
  return "\n".join(lines) + "\n"


def summarize_runs(
  workdirs: Iterable[str], out_dir: str | None = None
) -> tuple[list[dict[str, Any]], str]:
  """Aggregate runs by (method, held-out attack) -> ``(rows, markdown)``.

  ``workdirs`` may contain glob patterns. Each row: ``method``, ``heldout_attack``, ``n``
  (runs), ``seeds``, ``workdirs``, and for each metric in :data:`METRICS`: ``<m>_mean``,
  ``<m>_std`` (ddof=1, None for n < 2) and ``<m>_n`` (runs where it is finite). Rows are
  sorted by held-out attack, then method. With ``out_dir``, writes ``summary.md`` and
  ``summary.json`` (rows plus the per-run values) there.
  Raises FileNotFoundError naming the missing file (and the command that creates it).
  """
  dirs = expand_workdirs(workdirs)
  if not dirs:
    raise ConfigError("no workdirs given; e.g. 'workdirs/openset_*'")
  runs = [load_run(w) for w in dirs]
  _refuse_repeated_runs(runs)
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in runs:
    groups.setdefault((r["method"], r["heldout_attack"]), []).append(r)
  rows = []
  for (method, heldout), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    row: dict[str, Any] = {
      "method": method,
      "heldout_attack": heldout,
      "n": len(rs),
      "seeds": [r["seed"] for r in rs],
      "workdirs": [r["workdir"] for r in rs],
    }
    for m in METRICS:
      mean, std, n = metrics.mean_std([r[m] for r in rs])
      row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = mean, std, n
    rows.append(row)
  md = _markdown(rows)
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    jsonio.write_text(os.path.join(out_dir, "summary.md"), md)
    jsonio.write_json(
      os.path.join(out_dir, "summary.json"), {"metrics": list(METRICS), "rows": rows, "runs": runs}
    )
  return rows, md


def _define_flags():
  from absl import flags

  flags.DEFINE_string("out", None, "Directory for summary.md and summary.json (else print only).")


def main(argv) -> None:
  """``python -m divisive_jax.report [--out=DIR] WORKDIR_OR_GLOB ...``."""
  from absl import flags

  out = flags.FLAGS.out
  _, md = summarize_runs(argv[1:], out_dir=out)
  print(md, end="")
  if out:
    print(f"wrote {os.path.join(out, 'summary.md')} and {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, args=True)
