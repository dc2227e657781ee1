r"""Sweeps: every method x loss weight x seed, weights chosen on validation.

CLI::

  python -m divisive_jax.sweep --config=configs/shortcut.py:quick --methods=ce,rrr \
      --grid=rrr=1,100 --seeds=0,1 --workdir=W [--config.x=y ...] [--max_population=32]

For each method (`losses.METHODS`) the config gets that method's term weights; ``--grid``
(``term=values``, repeatable, or several separated by ';') gives the values tried for the method's
own term (the term of the same name: ``rrr`` for rrr, ``margin`` for margin, whose CYBORG term stays
at its recipe weight); ``ce`` and ``masked`` have none and train at their own weights. The members
-- seeds x weight settings -- train as populations (`divisive_jax.train`: N runs in one program) of
at most ``--max_population`` members, one after the other, in ``W/<method>/seeds_<first>-<last>/``.
``--controls=none,shuffled`` trains every method once per saliency control (`data.controls`), in
``W/<method>_<control>/`` (``none``: ``W/<method>/``), each chosen on validation on its own.

Choice (`choose`): for each weight setting the validation figure of ``config.best_metric`` at each
member's best checkpoint (val/auroc, val/accuracy: higher is better; val/loss: lower), averaged over
seeds (± is the sample standard deviation, ddof=1, as in `report`); the best mean wins, ties go to
the SMALLER weight. Test figures never enter the choice. Outputs: ``W/sweep.json`` (every member's
result, the grids, the choices) and ``W/sweep.md`` (per method: the grid with validation figures,
the chosen weight, test AUROC mean ± std over seeds with the per-seed values, and the saliency
alignment of the true-class CAM). Re-running resumes: a member with a ``result.json`` under the
method's folder whose ``config.json`` equals the member's config (fields safe on resume aside) is
not trained again, whichever population trained it -- so a sweep can grow (more seeds, more weights)
and trains only the members it lacks (`reusable_results`, `missing_populations`).
"""

from __future__ import annotations

import copy
import json
import os

from absl import flags, logging
from ml_collections import config_flags

from divisive_jax import cli, config_base, jsonio, layout, losses, metrics, multihost, preflight
from divisive_jax import workdir as workdir_lib
from divisive_jax.errors import ConfigError
from divisive_jax.members import grid_text, members_of, parse_grid, parse_seeds, setting_name
from divisive_jax.members import union_config, weight_text

METRIC_KEYS = {
  "val/auroc": ("val_auroc", 1.0),
  "val/accuracy": ("val_accuracy", 1.0),
  "val/loss": ("val_loss", -1.0),
}


def method_configs(config, methods, grid: str, seeds: str, controls: str = "") -> dict:
  """{method: population config}: the method's weights, the grid of its terms, the seeds; with
  ``controls`` (``--controls``; default ``config.data.saliency_control``), each method once per
  saliency control (`data.controls`), named ``<method>_<control>`` but for ``none``.

  ``seeds``: ``--seeds``; '' takes ``config.population.seeds``, else ``config.seed`` (one
  source: both given and different is an error). No method, a bad grid value or a grid term
  that none of the methods trains is an error naming the flag and the fix."""
  if not methods or not all(methods):
    raise ConfigError(
      f"--methods={','.join(methods)!r}: give one or more methods, comma-separated, of "
      f"{', '.join(losses.METHODS)}"
    )
  given, configured = parse_seeds(seeds, "--seeds"), parse_seeds(config.population.seeds)
  if given and configured and sorted(given) != sorted(configured):
    raise ConfigError(
      f"--seeds={seeds} and --config.population.seeds={config.population.seeds} disagree: give "
      "the sweep's seeds once, with --seeds"
    )
  seeds = ",".join(str(s) for s in given or configured or [int(config.seed)])
  settings = parse_grid(grid, "--grid")
  own = {m for m in methods if m in losses.TERMS and m != "ce"}  # the methods' own terms
  if unused := sorted({t for setting in settings for t in setting} - own):
    raise ConfigError(
      f"--grid gives values of {', '.join(unused)}, which none of --methods={','.join(methods)} "
      "trains (a method's grid is its own term: rrr for rrr, margin for margin). Fix: add the "
      "method to --methods or drop its --grid"
    )
  from divisive_jax.data.controls import CONTROLS

  controls = [x for x in controls.split(",") if x] or [config.data.saliency_control]
  if unknown := [x for x in controls if x not in CONTROLS]:
    raise ConfigError(f"--controls: unknown control(s) {unknown}; valid: {', '.join(CONTROLS)}")
  out = {}
  for control in dict.fromkeys(controls):
    for m in methods:
      if m not in losses.METHODS:
        raise ConfigError(f"--methods: unknown method {m!r}; valid: {', '.join(losses.METHODS)}")
      c = copy.deepcopy(config)
      config_base.set_method(c, m)
      c.final_eval = True  # the choice reads each member's validation result
      c.population.seeds = seeds
      c.population.weights = grid_text([{t: w for t, w in s.items() if t == m} for s in settings])
      c.data.saliency_control = control
      key = m if control == "none" else f"{m}_{control}"
      c.name = f"sweep_{key}"
      out[key] = c
  return out


def chunks(config, max_population: int) -> list:
  """The populations to train for a method's config: its seeds split so each has at most
  ``max_population`` members."""
  seeds = parse_seeds(config.population.seeds) or [int(config.seed)]
  per_seed = len(parse_grid(config.population.weights))
  if per_seed > max_population:
    raise ConfigError(
      f"the grid of {config.method} has {per_seed} settings, more than --max_population="
      f"{max_population} members of one program; raise --max_population or split the grid"
    )
  size = max(1, max_population // per_seed)
  out = []
  for i in range(0, len(seeds), size):
    c = copy.deepcopy(config)
    c.population.seeds = ",".join(str(s) for s in seeds[i : i + size])
    out.append((f"seeds_{seeds[i]}-{seeds[min(i + size, len(seeds)) - 1]}", c))
  return out


def missing_populations(config, members, found: dict, max_population: int) -> list:
  """[(folder name, population config)] that train exactly the members not in ``found``.

  The weight settings are grouped by the seeds they lack; each group is one population config
  (split by `chunks`), named ``seeds_<first>-<last>`` when it holds every setting of the grid
  and with the settings appended otherwise (``seeds_0-2_rrr10``), so a re-run after an
  interruption finds the same folders and resumes them."""
  settings = parse_grid(config.population.weights)
  groups: dict[tuple, list] = {}
  for setting in settings:
    lacking = tuple(x.seed for x in members if dict(x.weights) == setting and x.name not in found)
    if lacking:
      groups.setdefault(lacking, []).append(setting)
  out = []
  for seeds, group in groups.items():
    terms = {t for setting in group for t in setting}
    if len(group) == len(settings):
      parts = [(config.population.weights, "")]
    elif len(terms) == 1:  # one term: any subset of its values is a grid
      parts = [(grid_text(group), "_" + "_".join(setting_name(s) for s in group))]
    else:  # several terms: one population per setting
      parts = [(grid_text([s]), "_" + setting_name(s)) for s in group]
    for weights, suffix in parts:
      c = copy.deepcopy(config)
      c.population.seeds = ",".join(str(x) for x in seeds)
      c.population.weights = weights
      out += [(name + suffix, chunk) for name, chunk in chunks(c, max_population)]
  return out


def choose(results: list[dict], best_metric: str) -> dict:
  """The weight setting with the best mean validation figure over seeds (ties: the smaller).

  ``results``: member results (`members.result`); test is not read. Returns {'metric', 'grid':
  [{weights, val_mean, val_std, n, members, diverged}], 'chosen': weights or None}. A setting
  with a diverged member (its checkpoints are not the trained model of that weight) is not
  chosen; ``diverged`` counts those members."""
  if best_metric not in METRIC_KEYS:
    raise ConfigError(
      f"a sweep chooses on {', '.join(METRIC_KEYS)}; config.best_metric is {best_metric!r}"
    )
  key, sign = METRIC_KEYS[best_metric]
  groups: dict[tuple, list] = {}
  for r in results:
    groups.setdefault(tuple(sorted(r["weights"].items())), []).append(r)
  grid = []
  for weights, rs in groups.items():
    mean, std, n = metrics.mean_std([r[key] for r in rs])
    diverged = sum(layout.Status.of(r).diverged for r in rs)
    row = {"weights": dict(weights), "val_mean": mean, "val_std": std, "n": n}
    grid.append({**row, "members": len(rs), "diverged": diverged})
  grid.sort(key=lambda g: tuple(v for _, v in sorted(g["weights"].items())))
  ranked = [g for g in grid if g["val_mean"] is not None and not g["diverged"]]
  if not ranked:
    return {"metric": best_metric, "grid": grid, "chosen": None}
  best = max(ranked, key=lambda g: sign * g["val_mean"])  # max keeps the first (smallest) of ties
  return {"metric": best_metric, "grid": grid, "chosen": best["weights"]}


def summarize(results_by_method: dict, best_metric: str) -> dict:
  out = {}
  for m, results in results_by_method.items():
    choice = choose(results, best_metric)
    chosen = [r for r in results if r["weights"] == choice["chosen"]]
    chosen.sort(key=lambda r: r["seed"])
    test_mean, test_std, _ = metrics.mean_std([r["test_auroc"] for r in chosen])
    pe_mean, pe_std, _ = metrics.mean_std([r["test_alignment_pe"] for r in chosen])
    out[m] = {
      **choice,
      "test_auroc_mean": test_mean,
      "test_auroc_std": test_std,
      "test_auroc_per_seed": {str(r["seed"]): r["test_auroc"] for r in chosen},
      "test_alignment_pe_mean": pe_mean,
      "test_alignment_pe_std": pe_std,
      "members": results,
    }
  return out


def format_mean_std(mean, std, digits=2) -> str:
  """'0.75 ± 0.05'; the mean alone for one value; 'n/a' for none."""
  if mean is None:
    return "n/a"
  return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict, best_metric: str) -> str:
  lines = [
    f"Weights chosen on validation ({best_metric}, mean over seeds; ties: the smaller weight); "
    "test figures at the chosen weight only. Alignment: proportional energy of the min-max "
    "normalised true-class CAM inside the human mask (test).",
    "",
    "| method | chosen weight | val (chosen) | test AUROC | per seed | alignment PE |",
    "|---|---|---|---|---|---|",
  ]
  for m, s in summary.items():
    chosen = next((g for g in s["grid"] if g["weights"] == s["chosen"]), None)
    weights = _weights_text(s["chosen"] or {})
    weights = weights if chosen else "none: every setting diverged or has no validation figure"
    per_seed = ", ".join(format_mean_std(v, None) for v in s["test_auroc_per_seed"].values())
    val = format_mean_std(chosen["val_mean"], chosen["val_std"], 3) if chosen else "n/a"
    lines.append(
      f"| {m} | {weights} | {val} | {format_mean_std(s['test_auroc_mean'], s['test_auroc_std'])} "
      f"| {per_seed} | {format_mean_std(s['test_alignment_pe_mean'], s['test_alignment_pe_std'])} |"
    )
  lines += [
    "",
    "Validation grids:",
    "",
    "| method | weights | val mean ± std | seeds |",
    "|---|---|---|---|",
  ]
  for m, s in summary.items():
    for g in s["grid"]:
      w = _weights_text(g["weights"])
      mark = " (chosen)" if g["weights"] == s["chosen"] else ""
      if g["diverged"]:
        mark += f" (diverged: {g['diverged']} of {g['members']} seeds; not chosen)"
      lines.append(
        f"| {m} | {w}{mark} | {format_mean_std(g['val_mean'], g['val_std'], 3)} | {g['n']} |"
      )
  return "\n".join(lines) + "\n"


def _weights_text(weights: dict) -> str:
  return ", ".join(f"{t}={weight_text(w)}" for t, w in weights.items()) or "(method's own)"


def run_sweep(
  config,
  workdir: str,
  methods,
  grid: str = "",
  seeds: str = "",
  max_population: int = 32,
  allow_config_change: bool = False,
  controls: str = "",
) -> dict:
  """Train what is missing, choose on validation, write sweep.json and sweep.md.

  The sweep root is locked for the sweep's time (`workdir.exclusive`) and says it is a sweep
  (`layout.SWEEP_SETTINGS`: the flags and the base config). Prepared data are shared by its
  populations (``<workdir>/data`` unless ``config.data.data_dir`` is set). A population folder
  left unfinished (killed in training or in its final evaluation) is resumed before anything
  is planned, so its members are not trained again elsewhere."""
  if config.best_metric not in METRIC_KEYS:
    raise ConfigError(f"a sweep chooses on {', '.join(METRIC_KEYS)}; set --config.best_metric")
  configs = method_configs(config, methods, grid, seeds, controls)
  for c in configs.values():  # every member's config valid before anything is written
    preflight.check_config(union_config(c, members_of(c)))
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.exclusive(workdir):
    workdir_lib.check_kind(workdir, "sweep")
    if multihost.is_lead():
      seeds = next(iter(configs.values())).population.seeds  # as resolved (`method_configs`)
      settings = {"methods": list(methods), "grid": grid, "seeds": seeds, "controls": controls}
      settings["config"] = json.loads(config_base.to_json(config))
      jsonio.write_json(layout.path(workdir, layout.SWEEP_SETTINGS), settings)
    results_by_method = {}
    for m, c in configs.items():
      if not c.data.data_dir:
        c.data.data_dir = layout.path(os.path.abspath(workdir), layout.DATA)  # prepared once
      results_by_method[m] = _train_method(
        m, c, os.path.join(workdir, m), max_population, allow_config_change
      )
    summary = summarize(results_by_method, config.best_metric)
    if multihost.is_lead():
      record = {"best_metric": config.best_metric, "methods": summary}
      jsonio.write_json(layout.path(workdir, layout.SWEEP_JSON), record)
      md = markdown(summary, config.best_metric)
      jsonio.write_text(layout.path(workdir, layout.SWEEP_MD), md)
  return summary


def _train_method(m, c, method_dir, max_population, allow_config_change) -> list:
  """The results of method ``m``'s members (population config ``c``), training those missing."""
  from divisive_jax import train

  members = members_of(c)
  found = reusable_results(method_dir, members)
  for folder in unfinished(method_dir, members, found):
    logging.info("Sweep: resuming %s (%s), left unfinished", m, os.path.basename(folder))
    train.train_and_evaluate(config_base.load(folder), folder, allow_config_change)
  found = reusable_results(method_dir, members)
  if found and len(found) < len(members):
    logging.info("Sweep: %s: %d of %d members already trained", m, len(found), len(members))
  elif found:
    logging.info("Sweep: %s already trained; reusing its results", m)
  for name, chunk in missing_populations(c, members, found, max_population):
    logging.info("Sweep: training %s (%s)", m, name)
    folder = os.path.join(method_dir, name)
    found.update(train.train_and_evaluate(chunk, folder, allow_config_change))
  return [found[x.name] for x in members]


def unfinished(method_dir: str, members, found: dict) -> list[str]:
  """The population folders under ``method_dir`` that hold a member of ``members`` not in
  ``found`` (no ``result.json``) with exactly its config, fields safe on resume aside."""
  wanted = {x.name: x.config for x in members if x.name not in found}
  out = []
  for folder in layout.populations_in(method_dir):
    stored = members_of(config_base.load(folder))
    if any(x.name in wanted and _same(x.config, wanted[x.name]) for x in stored):
      out.append(folder)
  return out


def _same(a, b) -> bool:
  return not config_base.unsafe_differences(a, b)


def reusable_results(method_dir: str, members) -> dict:
  """{member name: result} of the members already trained under ``method_dir`` (in any of its
  populations) with exactly the member's config, fields safe on resume aside."""
  out = {}
  for member in members:
    for folder in layout.trained_members(method_dir, member.name):
      if _same(config_base.load(folder), member.config):
        fix = "delete it: the sweep evaluates that member again from its checkpoints"
        out[member.name] = jsonio.read_json(layout.path(folder, layout.RESULT), fix)
        break
  return out


def _define_flags():
  config_flags.DEFINE_config_file(
    "config", None, "Base config (e.g. configs/shortcut.py:quick).", lock_config=True
  )
  flags.DEFINE_string(
    "workdir", None, "Sweep folder (sweep.json, sweep.md, one folder per method)."
  )
  flags.DEFINE_list("methods", ["ce"], "Methods of losses.METHODS, comma-separated.")
  flags.DEFINE_multi_string("grid", [], "term=v1,v2,... (repeatable): the weights to try.")
  flags.DEFINE_string(
    "seeds",
    "",
    "Seeds, comma-separated (e.g. 0,1,2,3,4); default: config.population.seeds, else config.seed.",
  )
  flags.DEFINE_list(
    "controls", [], "Saliency controls, each method once per control (e.g. none,shuffled)."
  )
  flags.DEFINE_integer("max_population", 32, "Most members trained in one program.")
  flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue population folders trained with other settings (safe fields aside) with these "
    "(see python -m divisive_jax.main --helpfull). Without it such a sweep is refused.",
  )
  multihost.define_flags()
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  f = flags.FLAGS
  grid = ";".join(f.grid)
  args = (grid, f.seeds, f.max_population, f.allow_config_change, ",".join(f.controls))
  summary = run_sweep(f.config, f.workdir, f.methods, *args)
  if multihost.is_lead():
    print(markdown(summary, f.config.best_metric), end="")
    print(f"wrote {layout.path(f.workdir, layout.SWEEP_JSON)} and {layout.SWEEP_MD}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
