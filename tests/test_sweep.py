"""Sweeps: the weight is chosen on validation only (ties: the smaller), and the CLI trains every
method x weight x seed as populations, writes sweep.json and sweep.md, and resumes."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY_RUN, load_config, override_flags, subprocess_env

from divisive_jax import sweep
from divisive_jax.errors import ConfigError


def _r(seed, w, val, test):
  return {
    "seed": seed,
    "weights": {"rrr": w},
    "val_auroc": val,
    "val_accuracy": val,
    "val_loss": 1 - val,
    "test_auroc": test,
    "test_alignment_pe": 0.1,
  }


def test_choice_is_made_on_validation_only():
  # rrr=10 is best on test, rrr=100 on validation: validation decides.
  results = [_r(0, 10, 0.6, 0.9), _r(1, 10, 0.62, 0.95), _r(0, 100, 0.8, 0.3), _r(1, 100, 0.7, 0.2)]
  choice = sweep.choose(results, "val/auroc")
  assert choice["chosen"] == {"rrr": 100.0}
  assert [g["weights"]["rrr"] for g in choice["grid"]] == [10, 100]
  assert choice["grid"][1]["val_mean"] == pytest.approx(0.75) and choice["grid"][1]["n"] == 2
  assert sweep.choose(results, "val/loss")["chosen"] == {"rrr": 100.0}  # lower loss
  summary = sweep.summarize({"rrr": results}, "val/auroc")["rrr"]
  assert summary["test_auroc_per_seed"] == {"0": 0.3, "1": 0.2}  # reported, whatever it is
  assert summary["test_auroc_mean"] == pytest.approx(0.25)


def test_ties_go_to_the_smaller_weight():
  results = [_r(0, 100, 0.7, 0.1), _r(0, 1, 0.7, 0.9), _r(0, 10, 0.7, 0.5)]
  assert sweep.choose(results, "val/auroc")["chosen"] == {"rrr": 1.0}
  with pytest.raises(ValueError, match="chooses on"):
    sweep.choose(results, "epoch")


def test_method_configs_apply_the_grid_to_the_terms_a_method_uses():
  c = load_config("shortcut", "quick")
  configs = sweep.method_configs(c, ["ce", "rrr", "margin"], "rrr=1,100;margin=0.1", "0,1")
  assert configs["ce"].population.weights == "" and configs["ce"].population.seeds == "0,1"
  assert configs["rrr"].population.weights == "rrr=1,100"
  assert configs["margin"].population.weights == "margin=0.1"
  assert configs["margin"].loss.weights.cyborg == 0.5
  chunks = sweep.chunks(configs["rrr"], max_population=2)
  assert [n for n, _ in chunks] == ["seeds_0-0", "seeds_1-1"]


def test_method_configs_once_per_saliency_control():
  """``--controls``: every method once per control, ``<method>_<control>`` (``none``: the
  method's own name), the same weights and seeds; an unknown control names the flag."""
  c = load_config("shortcut", "quick")
  configs = sweep.method_configs(c, ["ce", "rrr"], "rrr=1,100", "0,1", "none,shuffled")
  assert list(configs) == ["ce", "rrr", "ce_shuffled", "rrr_shuffled"]
  assert configs["rrr_shuffled"].data.saliency_control == "shuffled"
  assert configs["rrr"].data.saliency_control == "none"
  assert configs["rrr_shuffled"].population.weights == configs["rrr"].population.weights
  assert configs["rrr_shuffled"].name == "sweep_rrr_shuffled"
  c.data.saliency_control = "inverted"  # no --controls: the config's own
  assert list(sweep.method_configs(c, ["ce"], "", "0")) == ["ce_inverted"]
  with pytest.raises(ConfigError, match=r"--controls: unknown control\(s\) \['mixed'\]; valid"):
    sweep.method_configs(c, ["ce"], "", "0", "none,mixed")


# The sweep of the tests: the shortcut data, 8 steps of a width-4 tiny model. The members are
# vmapped: on XLA:CPU a population of N unrolled steps compiles N times
# the code of one.
SWEEP = dict(
  TINY_RUN, num_train_steps=4, eval_every_steps=2, log_every_steps=2, population__strategy="vmap"
)


def test_sweep_writes_both_files_grows_and_the_cli_reuses(tmp_path, caplog):
  """A sweep trains every method x weight x seed (in this process: the sweep's library call),
  grows by a seed and a weight training only what it lacks -- the settings grouped by the seeds
  they lack -- and the CLI (a subprocess) on the finished sweep reuses every member and writes
  both files again."""
  import logging

  w = str(tmp_path / "sweep")
  config = load_config("iris_pad", "quick", **SWEEP)
  sweep.run_sweep(config, w, ["cyborg"], "cyborg=1", "0")
  with open(os.path.join(w, "sweep.json")) as f:
    s = json.load(f)
  assert sorted(s["methods"]) == ["cyborg"]
  cyborg = s["methods"]["cyborg"]
  assert [g["weights"]["cyborg"] for g in cyborg["grid"]] == [1.0]
  assert cyborg["chosen"] == {"cyborg": 1.0} and list(cyborg["test_auroc_per_seed"]) == ["0"]
  assert len(cyborg["members"]) == 1
  with open(os.path.join(w, "sweep.md")) as f:
    md = f.read()
  assert "| cyborg |" in md and "(chosen)" in md
  assert os.path.isfile(
    os.path.join(w, "cyborg", "seeds_0-0", "members", "s0_cyborg1", "eval_test.json")
  )
  first = os.path.getmtime(
    os.path.join(w, "cyborg", "seeds_0-0", "members", "s0_cyborg1", "result.json")
  )
  # Grown by a seed and a weight: only the members it lacks are trained, cyborg=1 lacking seed 1
  # and cyborg=10 both seeds: two populations.
  with caplog.at_level(logging.INFO):
    sweep.run_sweep(config, w, ["cyborg"], "cyborg=1,10", "0,1")
  assert "cyborg: 1 of 4 members already trained" in caplog.text
  cyborg_dirs = ["seeds_0-0", "seeds_0-1_cyborg10", "seeds_1-1_cyborg1"]
  assert sorted(os.listdir(os.path.join(w, "cyborg"))) == cyborg_dirs
  assert sorted(os.listdir(os.path.join(w, "cyborg", "seeds_0-1_cyborg10", "members"))) == [
    "s0_cyborg10",
    "s1_cyborg10",
  ]
  assert first == os.path.getmtime(
    os.path.join(w, "cyborg", "seeds_0-0", "members", "s0_cyborg1", "result.json")
  )
  with open(os.path.join(w, "sweep.json")) as f:
    cyborg = json.load(f)["methods"]["cyborg"]
  assert [g["weights"]["cyborg"] for g in cyborg["grid"]] == [1.0, 10.0]
  assert [g["n"] for g in cyborg["grid"]] == [2, 2] and len(cyborg["test_auroc_per_seed"]) == 2
  assert cyborg["chosen"] in ({"cyborg": 1.0}, {"cyborg": 10.0})
  # The CLI on the grown sweep: nothing left to train, every member is reused.
  os.remove(os.path.join(w, "sweep.md"))
  cmd = [
    sys.executable,
    "-m",
    "divisive_jax.sweep",
    "--config=configs/iris_pad.py:quick",
    "--methods=cyborg",
    "--grid=cyborg=1,10",
    "--seeds=0,1",
    f"--workdir={w}",
    *override_flags(SWEEP),
  ]
  done = subprocess.run(
    cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr.count("already trained; reusing") == 1
  assert sorted(os.listdir(os.path.join(w, "cyborg"))) == cyborg_dirs
  assert "| cyborg |" in done.stdout and "wrote " in done.stdout
  assert os.path.isfile(os.path.join(w, "sweep.md"))


def test_only_the_missing_members_are_planned():
  """Settings are grouped by the seeds they lack; a group with every setting keeps the plain
  folder name (so a first run and its resumption agree), a partial one names its settings."""
  c = sweep.method_configs(load_config("shortcut", "quick"), ["rrr"], "rrr=1,10", "0,1")["rrr"]
  members = sweep.members_of(c)
  plan = lambda found: [  # noqa: E731
    (n, p.population.seeds, p.population.weights)
    for n, p in sweep.missing_populations(c, members, found, 32)
  ]
  assert plan({}) == [("seeds_0-1", "0,1", "rrr=1,10")]
  assert plan({"s0_rrr1": {}, "s0_rrr10": {}}) == [("seeds_1-1", "1", "rrr=1,10")]
  assert plan({"s0_rrr1": {}, "s1_rrr1": {}}) == [("seeds_0-1_rrr10", "0,1", "rrr=10")]
  assert plan({m.name: {} for m in members}) == []
  two = sweep.method_configs(load_config("shortcut", "quick"), ["rrr"], "rrr=1,10", "0,1,2,3")
  assert [
    n for n, _ in sweep.missing_populations(two["rrr"], sweep.members_of(two["rrr"]), {}, 4)
  ] == [
    "seeds_0-1",
    "seeds_2-3",
  ]


def test_results_of_another_config_are_not_reused(tmp_path):
  """A finished member is reused only when its stored config is the member's (fields safe on
  resume aside): a changed learning rate trains it again."""
  config = load_config("shortcut", "quick")
  c = sweep.method_configs(config, ["rrr"], "rrr=1", "0")["rrr"]
  (member,) = sweep.members_of(c)
  d = tmp_path / "rrr" / "seeds_0-0" / "members" / member.name
  d.mkdir(parents=True)
  (d / "result.json").write_text('{"seed": 0}')
  (d / "config.json").write_text(sweep.config_base.to_json(member.config))
  assert sweep.reusable_results(str(tmp_path / "rrr"), [member]) == {member.name: {"seed": 0}}
  safe = copy.deepcopy(member.config)
  safe.log_every_steps = 1  # safe on resume
  (d / "config.json").write_text(sweep.config_base.to_json(safe))
  assert member.name in sweep.reusable_results(str(tmp_path / "rrr"), [member])
  changed = copy.deepcopy(member.config)
  changed.optim.lr = 0.5
  (d / "config.json").write_text(sweep.config_base.to_json(changed))
  assert sweep.reusable_results(str(tmp_path / "rrr"), [member]) == {}


@pytest.mark.parametrize(
  "methods,grid,seeds,fragment",
  [
    ([], "", "0", "--methods='': give one or more methods"),
    (["rrr"], "rrr=1,,100", "0", "--grid: the values of rrr ('1,,100') must be finite numbers"),
    (["rrr"], "rrr=1;rrr=10", "0", "--grid names rrr twice"),
    (["rrr"], "rrr=1,1", "0", "rrr has a value twice"),
    (["ce", "cyborg"], "rrr=1,100", "0", "--grid gives values of rrr, which none of"),
    (["rrr"], "rrr=nan", "0", "must be finite numbers >= 0"),
    (["ce"], "", "0,,1", "--seeds='0,,1': give integer seeds"),
  ],
)
def test_sweep_flags_that_would_be_misread_are_refused(tmp_path, methods, grid, seeds, fragment):
  """An empty --methods, an empty or repeated grid value or term, a grid for a method that is
  not swept: one line naming the flag and the fix, before anything is written."""
  w = str(tmp_path / "w")
  with pytest.raises(ConfigError) as e:
    sweep.run_sweep(load_config("shortcut", "quick"), w, methods, grid, seeds)
  assert fragment in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(w)


def test_population_weights_name_each_term_once():
  c = load_config("iris_pad", "quick,rrr", population__weights="rrr=1;rrr=10")
  with pytest.raises(ConfigError, match="config.population.weights names rrr twice"):
    sweep.members_of(c)


def test_the_sweep_cli_prints_one_line_for_empty_methods(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "divisive_jax.sweep",
      "--config=configs/shortcut.py:quick",
      "--methods=",
      f"--workdir={tmp_path / 'w'}",
    ],
    cwd=REPO,
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
  assert "--methods" in line and "give one or more methods" in line


def test_a_setting_with_diverged_members_is_not_chosen():
  """rrr=1e38 looks best on validation, but one of its members stopped on a non-finite loss:
  its checkpoints are not the trained model of that weight, so it is not chosen, and the grid
  says why."""
  results = [_r(0, 1, 0.6, 0.6), _r(1, 1, 0.62, 0.6), _r(0, 1e38, 0.9, 0.65), _r(1, 1e38, 0.7, 0.6)]
  results[2]["status"] = {"state": "diverged", "step": 1}
  results[3]["status"] = {"state": "early_stopped", "step": 40}  # stopping early is not diverging
  choice = sweep.choose(results, "val/auroc")
  assert choice["chosen"] == {"rrr": 1.0}
  assert [(g["weights"]["rrr"], g["diverged"], g["members"]) for g in choice["grid"]] == [
    (1.0, 0, 2),
    (1e38, 1, 2),
  ]
  md = sweep.markdown(sweep.summarize({"rrr": results}, "val/auroc"), "val/auroc")
  assert "rrr=1e+38 (diverged: 1 of 2 seeds; not chosen)" in md
  # Records written before the status existed said it as text ('frozen'): still read.
  legacy = [{k: v for k, v in r.items() if k != "status"} for r in results]
  all_diverged = [dict(r, frozen="non-finite loss or parameters at step 2") for r in legacy]
  assert sweep.choose(all_diverged, "val/auroc")["chosen"] is None
  md = sweep.markdown(sweep.summarize({"rrr": all_diverged}, "val/auroc"), "val/auroc")
  assert "| rrr | none: every setting diverged or has no validation figure |" in md


def test_a_sweep_killed_in_its_final_evaluation_resumes_in_place(tmp_path, caplog):
  """A population killed after training, in its final evaluation (here: a member's result and
  eval files removed), is resumed where it is -- evaluated, not trained again in a new folder --
  and the CSV data of a sweep's populations are prepared once, under the sweep root."""
  import logging

  sys.path.insert(0, os.path.dirname(__file__))
  from test_cli import _csv_data

  _csv_data(str(tmp_path))
  csv = dict(
    data__csv_path=str(tmp_path / "protocol.csv"),
    data__image_dir=str(tmp_path / "images"),
    data__map_dir=str(tmp_path / "maps"),
    data__attack_type_from="none",
    data__image_size=32,
    model__width=4,
    batch_size=4,
    num_train_steps=4,
    eval_every_steps=4,
  )
  w = str(tmp_path / "sweep")
  config = load_config("iris_pad", "quick", **csv)
  with caplog.at_level(logging.INFO):
    sweep.run_sweep(config, w, ["ce"], "", "0,1", max_population=1)  # two populations
  assert sorted(os.listdir(os.path.join(w, "ce"))) == ["seeds_0-0", "seeds_1-1"]
  assert caplog.text.count("Preparing") == 1  # once, under the sweep root
  assert os.listdir(os.path.join(w, "data", "csv_protocol"))
  member = os.path.join(w, "ce", "seeds_1-1", "members", "s1")
  for name in ("result.json", "eval_test.json", "eval_val.json"):
    os.remove(os.path.join(member, name))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    sweep.run_sweep(config, w, ["ce"], "", "0,1", max_population=1)
  assert "resuming ce (seeds_1-1), left unfinished" in caplog.text
  assert "is complete (step 4 of 4): nothing to train" in caplog.text
  assert sorted(os.listdir(os.path.join(w, "ce"))) == ["seeds_0-0", "seeds_1-1"]  # no retraining
  assert os.path.isfile(os.path.join(member, "result.json"))
  assert "Preparing" not in caplog.text  # the prepared data of the first sweep are reused


def test_weights_are_exact_in_configs_and_names():
  """A grid value is trained as given, not rounded to 6 digits, and two values that agree to 6
  digits are two members."""
  from divisive_jax import members as members_lib

  config = load_config("iris_pad", "quick")
  (c,) = sweep.method_configs(config, ["rrr"], "rrr=0.1234567,0.1234568,1e38", "0").values()
  ms = members_lib.members_of(c)
  assert [m.config.loss.weights.rrr for m in ms] == [0.1234567, 0.1234568, 1e38]
  assert [m.name for m in ms] == ["s0_rrr0.1234567", "s0_rrr0.1234568", "s0_rrr1e+38"]
  assert members_lib.weight_text(0.1) == "0.1" and members_lib.weight_text(1e-7) == "1e-07"
  missing = sweep.missing_populations(c, ms, {"s0_rrr1e+38": {}}, 32)
  assert [name for name, _ in missing] == ["seeds_0-0_rrr0.1234567_rrr0.1234568"]
  ((_, chunk),) = missing
  assert [m.config.loss.weights.rrr for m in members_lib.members_of(chunk)] == [
    0.1234567,
    0.1234568,
  ]


def test_a_sweep_whose_one_member_population_diverges_completes(tmp_path, caplog):
  """A population of one member that diverges is frozen and reported, like a member of a larger
  population (a single run stops instead): the sweep completes, marks the setting diverged in
  sweep.json and sweep.md, never chooses it, and a re-run trains nothing. The member's records
  say it diverged and give the step of the state they hold, in every output."""
  import logging

  from divisive_jax import evaluate, report

  config = load_config("iris_pad", "quick", **dict(TINY_RUN, num_train_steps=4, eval_every_steps=2))
  w = str(tmp_path / "sweep")
  summary = sweep.run_sweep(config, w, ["rrr"], "rrr=1e38", "0")
  assert summary["rrr"]["chosen"] is None
  (g,) = summary["rrr"]["grid"]
  assert (g["weights"], g["diverged"], g["members"]) == ({"rrr": 1e38}, 1, 1)
  with open(os.path.join(w, "sweep.md")) as f:
    assert "rrr=1e+38 (diverged: 1 of 1 seeds; not chosen)" in f.read()
  member = os.path.join(w, "rrr", "seeds_0-0", "members", "s0_rrr1e+38")
  with open(os.path.join(member, "result.json")) as f:
    result = json.load(f)
  assert result["status"] == {"state": "diverged", "step": 1}
  assert result["trained_step"] == 0 and result["best_step"] >= 1  # the state of step 0
  out = evaluate.evaluate_workdir(member, split="test")
  assert out["status"]["state"] == "diverged" and out["trained_step"] == 0
  rows, md = report.summarize_runs([member])
  assert rows[0]["method"].endswith("[diverged]") and "[diverged]" in md
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = sweep.run_sweep(config, w, ["rrr"], "rrr=1e38", "0")
  assert "rrr already trained; reusing its results" in caplog.text
  assert "Training" not in caplog.text and again["rrr"]["chosen"] is None


def _checkpointed(folder: str) -> bool:
  return any(
    name.isdigit()
    for d, _, _ in os.walk(folder)
    if d.endswith("checkpoints")
    for name in os.listdir(d)
  )


def test_sigterm_stops_a_sweep(tmp_path):
  """SIGTERM while a sweep trains its first population: the population saves, the sweep trains
  nothing more, says in one line how to resume and exits 143 (128 + SIGTERM), as a cluster's
  scheduler expects. Re-running the sweep resumes the population and finishes the sweep."""
  import signal

  slow = dict(SWEEP, num_train_steps=80, eval_every_steps=40, log_every_steps=5)
  slow.update(checkpoint_every_steps=10)
  w = str(tmp_path / "sweep")
  cmd = [sys.executable, "-m", "divisive_jax.sweep", "--config=configs/iris_pad.py:quick"]
  cmd += [
    "--methods=ce,cyborg",
    "--grid=cyborg=1",
    "--seeds=0",
    "--max_population=1",
    f"--workdir={w}",
  ]
  p = subprocess.Popen(
    cmd + override_flags(slow), cwd=REPO, env=subprocess_env(1), stderr=subprocess.PIPE, text=True
  )
  t0 = time.time()
  while not _checkpointed(w) and p.poll() is None and time.time() - t0 < 240:
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  err = p.communicate(timeout=120)[1]
  assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("stopped: SIGTERM at step ") and "seeds_0-0" in last, last
  assert last.endswith("re-run the same command to resume"), last
  assert not os.path.exists(os.path.join(w, "cyborg"))  # nothing trained after the signal
  config = load_config("iris_pad", "quick", **slow)
  summary = sweep.run_sweep(config, w, ["ce", "cyborg"], "cyborg=1", "0", max_population=1)
  assert sorted(summary) == ["ce", "cyborg"] and summary["cyborg"]["chosen"] == {"cyborg": 1.0}


def test_ctrl_c_asks_for_a_save_and_a_second_one_stops_at_once():
  """SIGINT is SIGTERM's twin (the job saves and stops: `Interrupted`, exit status 130); a
  second one ends the process at once with one line and status 130 (it used to raise
  KeyboardInterrupt, which crashed the interpreter, -11, while XLA's threads ran)."""
  import signal

  from divisive_jax import loop
  from divisive_jax.errors import Interrupted

  before = signal.getsignal(signal.SIGINT)
  with loop.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert stop.signal == signal.SIGINT and stop.requested()
    with pytest.raises(Interrupted, match="SIGINT at step 7: the checkpoints of W are saved") as e:
      stop.check("W", 7)
    assert e.value.exit_status == 130
  assert signal.getsignal(signal.SIGINT) is before  # restored
  code = (
    "import os, signal, time\n"
    "from divisive_jax import loop\n"
    "with loop.StopSignal():\n"
    "  os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)\n"
    "  os.kill(os.getpid(), signal.SIGINT); time.sleep(60)\n"
    "print('not stopped')\n"
  )
  p = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
  )
  assert p.returncode == 130 and "not stopped" not in p.stdout, (p.returncode, p.stderr)
  assert p.stderr.strip().splitlines()[-1].startswith("stopped: a second SIGINT: stopped at once")


def test_the_sweeps_seeds_come_from_one_source(tmp_path):
  """--seeds, else --config.population.seeds, else config.seed; both given and different is an
  error before anything is written (a sweep used to train seed 0 alone when the seeds came in
  the config)."""
  two = load_config("iris_pad", "quick", population__seeds="0,1")
  assert sweep.method_configs(two, ["ce"], "", "")["ce"].population.seeds == "0,1"
  assert sweep.method_configs(two, ["ce"], "", "1,0")["ce"].population.seeds == "1,0"
  assert (
    sweep.method_configs(load_config("iris_pad", "quick", seed=3), ["ce"], "", "")[
      "ce"
    ].population.seeds
    == "3"
  )
  w = str(tmp_path / "w")
  with pytest.raises(ConfigError, match="--seeds=0 and --config.population.seeds=0,1 disagree"):
    sweep.run_sweep(two, w, ["ce"], "", "0")
  assert not os.path.exists(w)


def test_a_sweep_at_an_image_size_without_a_cam_grid_writes_nothing(tmp_path):
  """Issue 28, items 5 and 9: the 1x1 CAM grid is refused before the sweep writes anything
  (the fault-injection run found sweep_settings.json and a population folder left behind)."""
  w = str(tmp_path / "w")
  with pytest.raises(ConfigError, match="image_size=1 gives a 1x1 CAM grid"):
    sweep.run_sweep(load_config("iris_pad", "quick", data__image_size=1), w, ["ce", "rrr"], "", "0")
  assert not os.path.exists(w)
