"""Smoke tests of benchmarks/*.py: each script runs with tiny settings and writes valid JSON with
the expected keys. No timing assertions (the figures themselves are in benchmarks/RESULTS.md).

The scripts run in this process (their ``main(argv)``, on this session's 4 simulated devices and
its compiled programs), except where another process is what is tested: the GPU script, which
runs each part in a process of its own, and the PyTorch comparison in a Python that has torch."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from helpers import BENCH, REPO, bench_module, subprocess_env


def _run(script, tmp_path, *args, python=None, devices=2):
  """(the JSON it wrote, its stdout): in this process, or with ``python`` in a subprocess."""
  out = tmp_path / f"{script}.json"
  if python is not None:
    stdout = _call(script, *args, "--json", str(out), python=python, devices=devices)
  else:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      bench_module(script).main([*args, "--json", str(out)])
    stdout = buf.getvalue()
  with open(out) as f:
    return json.load(f), stdout


def _call(script, *args, python=sys.executable, devices=2, timeout=600):
  cmd = [python, os.path.join(BENCH, f"{script}.py"), *args]
  proc = subprocess.run(
    cmd, cwd=REPO, env=subprocess_env(devices), capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


# The tiny settings the throughput and gpu smoke tests share, so the second compiles nothing new
# (the session's persistent compilation cache, tests/conftest.py).
TINY = ["--image_size", "32", "--batch", "4"]


def test_cam_overhead_smoke(tmp_path):
  result, stdout = _run(
    "cam_overhead",
    tmp_path,
    "--models",
    "tiny",
    "--stem",
    "small",
    "--width",
    "4",
    "--image_size",
    "16",
    "--batch",
    "4",
    "--devices",
    "2",
    "--variants",
    "ce,difference,masked",
    "--steps",
    "2",
    "--warmup",
    "0",
    "--quiet",
  )
  assert result["benchmark"] == "cam_overhead"
  assert "machine" in result and "memory_label" in result
  assert [r["variant"] for r in result["rows"]] == ["ce", "difference", "masked"]
  assert [r["mask_input"] for r in result["rows"]] == [False, False, True]  # set_method's
  for r in result["rows"]:
    for key in (
      "compile_s",
      "step_ms",
      "ratio_to_ce",
      "images_per_s",
      "flops",
      "flops_ratio_to_ce",
      "temp_mb",
      "rss_hwm_delta_mb",
      "hlo_ops",
      "first_loss",
    ):
      assert key in r, key
    assert r["step_ms"] > 0 and len(r["step_ms_per_round"]) == 2
  assert result["rows"][0]["ratio_to_ce"] == 1.0
  assert [c["variant"] for c in result["floor_checks"]] == ["difference"]
  assert "| tiny | difference |" in stdout


def test_scaling_smoke(tmp_path):
  result, stdout = _run(
    "scaling",
    tmp_path,
    "--width",
    "4",
    "--image_size",
    "16",
    "--devices",
    "1,2",
    "--per_device_batch",
    "2",
    "--global_batch",
    "2",  # = 1 x per-device 2: that step's second compilation is a cache hit
    "--losses",
    "difference",
    "--steps",
    "1",
    "--inner",
    "1",
    "--warmup",
    "0",
    "--quiet",
  )
  assert result["benchmark"] == "scaling"
  assert "simulated CPU devices" in result["label"] and "simulated CPU devices" in stdout
  keys = {(r["mode"], r["devices"]) for r in result["rows"]}
  assert keys == {("per_device", 1), ("per_device", 2), ("global", 1), ("global", 2)}
  for r in result["rows"]:
    for key in ("steps_per_s", "images_per_s", "images_per_s_vs_1_device", "global_batch"):
      assert key in r, key
  assert {r["global_batch"] for r in result["rows"] if r["mode"] == "global"} == {2}


def test_shortcut_table_smoke(tmp_path):
  result, stdout = _run(
    "shortcut_table",
    tmp_path,
    "--methods",
    "rrr",
    "--seeds",
    "1",
    "--grid_input",
    "0.5",
    "--num_train_steps",
    "4",
    "--width",
    "4",
    "--workdir",
    str(tmp_path / "workdir"),
  )
  assert result["benchmark"] == "shortcut_table"
  assert [r["method"] for r in result["rows"]] == ["rrr"]
  row = result["rows"][0]
  assert row["published_test_auroc"] == "0.49 ± 0.08"
  assert row["chosen_weight"] == "rrr=0.5"
  assert 0.0 <= row["test_auroc_mean"] <= 1.0 and list(row["test_auroc_per_seed"]) == ["0"]
  assert [g["weights"] for g in row["val_grid"]] == [{"rrr": 0.5}]
  assert "test AUROC (published)" in stdout


def test_shortcut_table_published_figures():
  shortcut_table = bench_module("shortcut_table")

  assert shortcut_table.PUBLISHED["ce"] == "0.00 ± 0.00"
  assert shortcut_table.PUBLISHED.get("difference") is None


def test_shortcut_table_models_are_valid_configs():
  """Every ``--model`` gives a config that validates; the tiny ViT takes patch 4 (28 px: a 7 x 7
  token grid, as the tiny ResNet's CAM)."""
  shortcut_table = bench_module("shortcut_table")

  from divisive_jax import config_base
  from divisive_jax.errors import ConfigError

  for name in shortcut_table.MODELS:
    config = shortcut_table.make_config(shortcut_table.parse_args(["--model", name, "--workdir=w"]))
    config_base.validate(config)
    assert config.data.image_size == 28
  assert (config.model.name, config.model.patch_size) == ("vit_tiny", 4)
  config.model.patch_size = 8
  with pytest.raises(ConfigError, match="patch"):
    config_base.validate(config)


def _torch_python():
  """A Python with torch + torchvision: this one, or the one $DIVISIVE_JAX_TORCH_PYTHON names
  (a venv with the project's ``torch`` extra, kept apart from the test venv for its size)."""
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    return sys.executable
  except ImportError:
    return os.environ.get("DIVISIVE_JAX_TORCH_PYTHON") or None


def test_torch_compare_skips_cleanly_without_torch(tmp_path):
  try:
    import torch  # noqa: F401

    pytest.skip("torch is importable here; the skip path is not reachable")
  except ImportError:
    pass
  result, stdout = _run("torch_compare", tmp_path, "--steps", "1")
  assert result == {"benchmark": "torch_compare", "skipped": True, "reason": result["reason"]}
  assert "skipped" in stdout


def test_torch_compare_smoke(tmp_path):
  python = _torch_python()
  if python is None:
    pytest.skip("no Python with torch + torchvision")
  probe = subprocess.run(
    [python, "-c", "import torch, torchvision, jax, flax, optax, ml_collections"],
    capture_output=True,
  )
  if probe.returncode:
    pytest.skip(f"{python} lacks part of the stack: {probe.stderr.decode()[-300:]}")
  result, stdout = _run(
    "torch_compare",
    tmp_path,
    "--model",
    "resnet18",
    "--image_size",
    "32",
    "--batch",
    "2",
    "--variants",
    "cam",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--quiet",
    python=python,
    devices=1,
  )
  assert result["skipped"] is False
  assert [r["variant"] for r in result["rows"]] == ["cam"]
  for r in result["rows"]:
    for key in ("jax_step_ms", "torch_step_ms", "ours_over_torch_images_per_s"):
      assert r[key] > 0, key
  assert result["cam_over_ce"] == {}  # needs both variants
  assert result["rows"][0]["torch_compiled"] is False and result["rows"][0]["dtype"] == "float32"


def test_throughput_smoke(tmp_path):
  result, stdout = _run(
    "throughput",
    tmp_path,
    "--model",
    "tiny",
    "--width",
    "4",
    "--stem",
    "small",
    *TINY,
    "--dtype",
    "bfloat16",
    "--n_images",
    "40",
    "--rounds",
    "2",
    "--steps_per_round",
    "1",
    "--input_batches",
    "2",
    "--resident_k",
    "1",
    "--platform",
    "cpu",
    "--quiet",
    devices=1,
  )
  assert result["benchmark"] == "throughput"
  for key in (
    "input_examples_per_s",
    "step_examples_per_s",
    "end_to_end_examples_per_s",
    "end_to_end_over_step",
    "resident_examples_per_s",
    "resident_over_step",
  ):
    assert result[key] > 0, key
  assert result["data"]["n_train"] == 32 and result["data"]["prepared_now"]
  assert set(result["examples_per_s_per_round"]) == {"input", "step", "end_to_end", "resident"}
  assert all(len(v) == 2 for v in result["examples_per_s_per_round"].values())
  assert "machine" in result and "packages" in result["machine"]
  checks = {c["name"]: c for c in result["floor_checks"]}
  assert checks["input_examples_per_s"]["ok"] is None  # the floor is defined at 224 px
  assert checks["end_to_end_over_step"]["floor"] == 0.9
  assert "floor end_to_end_over_step >= 0.9" in stdout


def test_gpu_smoke(tmp_path):
  """benchmarks/gpu.py end to end on the CPU: a JAX part (tiny, 32 px) in its own process and
  the PyTorch part (skipped where torch is absent)."""
  out = tmp_path / "out"
  data = str(tmp_path / "data")
  stdout = _call("gpu", "--platform", "cpu", "--smoke", "--out", str(out), "--data_dir", data)
  assert sorted(os.listdir(out)) == ["gpu.json", "gpu.md", "gpu_log.txt"]
  with open(out / "gpu.json") as f:
    report = json.load(f)
  assert report["benchmark"] == "gpu" and report["skipped_parts"] == []
  jax_part, torch_part = report["parts"]
  assert jax_part["part"] == "tiny/bfloat16" and jax_part["status"] == "ok", jax_part
  assert [r["variant"] for r in jax_part["rows"]] == ["ce", "difference"]
  assert jax_part["rows"][0]["ratio_to_ce"] == 1.0
  for key in ("end_to_end_over_step", "resident_over_step", "input_examples_per_s"):
    assert jax_part[key] > 0, key
  assert jax_part["batches_tried"] == [4] and jax_part["prefetch"] == 4  # the accel variant's
  assert report["machine"]["backend"] == "cpu"
  assert torch_part["part"] == "torch/resnet18/float32"
  assert torch_part["status"] in ("ok", "skipped"), torch_part
  with open(out / "gpu.md") as f:
    md = f.read()
  assert "| tiny/bfloat16 | 4 |" in md
  assert "=== tiny/bfloat16: ok" in stdout


def test_gpu_wheels_script_parses():
  proc = subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_wheels.sh")], capture_output=True)
  assert proc.returncode == 0, proc.stderr


def test_population_smoke(tmp_path):
  """Populations of 1 and 2 through the trainer's dispatch, and one member against the
  single-run step of a git revision (here HEAD: the mechanism, in one process)."""
  in_git = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True)
  against = ["--against", "HEAD"] if in_git.returncode == 0 else []
  result, stdout = _run(
    "population",
    tmp_path,
    "--members",
    "1,2",
    "--image_size",
    "16",
    "--batch",
    "4",
    "--rounds",
    "1",
    *against,
    devices=1,
  )
  assert result["benchmark"] == "population"
  assert [r["members"] for r in result["rows"]] == [1, 2]
  one, two = result["rows"]
  assert one["sequential_images_per_s"] > 0 and "vmap_images_per_s" not in one  # no member axis
  for key in (
    "sequential_images_per_s",
    "vmap_images_per_s",
    "unroll_images_per_s",
    "vmap_speedup",
    "unroll_speedup",
  ):
    assert two[key] > 0, key
  assert "population (unroll) img/s" in stdout
  compiled = result["compiled"]
  convs = {k: v["hlo_ops"]["convolution"] for k, v in compiled.items()}
  assert convs["unroll_2"] >= 2 * convs["sequential_2"] > 0  # two members' convolutions
  if against:
    a = result["against"]
    assert a["one_member_over_against"] > 0 and a["flops"][0] == a["flops"][1]
    assert a["convolutions"][0] == a["convolutions"][1] == convs["sequential_1"]
    assert "one member / the single run of HEAD" in stdout


def test_selection_digits_are_a_csv_protocol_set(tmp_path):
  """`selection.py`'s data: real digits (scikit-learn's bundled scans) as a CSV-protocol set
  with both classes in every split (its training runs are the benchmark, not a test)."""
  from helpers import load_config

  selection = bench_module("selection")

  from divisive_jax.data import load_splits

  csv = selection.write_digits(str(tmp_path / "digits"))
  config = load_config(
    "iris_pad",
    "quick",
    data__csv_path=csv,
    data__image_dir=str(tmp_path / "digits" / "images"),
    data__attack_type_from="none",
    data__class_names=("Negative", "Positive"),
  )
  splits = load_splits(config.data, str(tmp_path / "w"))
  assert [len(s) for s in (splits.train, splits.val, splits.test)] == [120, 40, 40]
  for s in (splits.train, splits.val, splits.test):
    assert sorted(set(s.label.tolist())) == [0, 1]


def test_faults_compares_outputs_and_tables_its_trials(tmp_path):
  """benchmarks/faults.py's judgement (the sweeps themselves take minutes: RESULTS.md has a run):
  byte-equal outputs, outputs equal to float rounding, different ones; lost files; the table."""
  faults = bench_module("faults")
  member = tmp_path / "w" / "m"
  member.mkdir(parents=True)
  (member / "result.json").write_text('{"test_auroc": 0.75, "status": "live"}')
  (member / "metrics.jsonl").write_text("{}")
  reference = faults.outputs(str(tmp_path / "w"))
  assert list(reference) == [os.path.join("m", "result.json")]
  assert faults.compare(str(tmp_path / "w"), reference) == ("bit-identical", 0.0)
  before = faults.files(str(tmp_path / "w"))
  (member / "result.json").write_text('{"test_auroc": 0.7500000001, "status": "live"}')
  assert faults.compare(str(tmp_path / "w"), reference)[0] == "equal to rounding"
  (member / "result.json").write_text('{"test_auroc": 0.76, "status": "live"}')
  assert faults.compare(str(tmp_path / "w"), reference)[0] == "different"
  (member / "metrics.jsonl").unlink()
  assert faults.lost(before, str(tmp_path / "w")) == [os.path.join("m", "metrics.jsonl")]
  assert faults.one_line_error(1, "I1205 log\nerror: config.json is damaged\n").startswith("error")
  assert faults.one_line_error(1, "Traceback (most recent call last):\nerror: x") is None
  rows = [
    dict(fault="kill -9", detail="after 3 s", outcome="exit -9", rerun="bit-identical", lost=[]),
    dict(
      fault="x",
      detail="y",
      outcome="one line: error: z",
      rerun="different",
      lost=["a"],
      unchanged=True,
    ),
  ]
  text = faults.table({"seed": 0, "trials": rows})
  assert "| kill -9 | after 3 s | killed | bit-identical | none |" in text
  assert "| x | y | one line: error: z; no file changed | different | a |" in text
  assert text.startswith("2 trials (seed 0); re-runs: {'bit-identical': 1, 'different': 1}")


def test_profile_cpu_classes_the_steps_ops(tmp_path):
  """benchmarks/profile_cpu.py on the tiny model: the traced HLO ops of the train step, classed
  (convolutions by direction, BatchNorm, ...), and a table; PyTorch's side where torch imports."""
  out, stdout = _run(
    "profile_cpu", tmp_path, "--model", "tiny", "--image_size", "32", "--batch", "8",
    "--steps", "1", "--rounds", "1", "--no_torch",
  )  # fmt: skip
  kinds = out["jax"]["by_kind"]
  for kind in ("conv 3x3 forward", "conv 3x3 input grad", "conv 3x3 weight grad", "BatchNorm"):
    assert kinds.get(kind, 0) > 0, (kind, kinds)
  assert out["jax"]["step_ms"] > 0 and len(out["jax"]["top_ops"]) > 5
  assert "| op kind | ms a step | share |" in stdout


def test_profile_cpu_classes_the_patches_of_a_patch_gradient_layer():
  """The patches a patch-gradient layer builds (`models.resnet.patches`, under its name scope)
  are a class of their own, not the ReLU / residual-add passes they used to fall in."""
  import jax
  import jax.numpy as jnp

  from divisive_jax.models import resnet

  profile_cpu = bench_module("profile_cpu")
  x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
  grad = jax.jit(jax.grad(lambda w: jnp.sum(resnet.conv_patch_grad(x, w, 1, 1))))
  instrs = profile_cpu.hlo_instructions(grad.lower(w).compile().as_text())
  kinds = {profile_cpu.classify(n, instrs, 2) for n in instrs if n != "__entry__"}
  assert "patches (patch-gradient layers)" in kinds, kinds


def test_cpu_kernels_smoke(tmp_path):
  """The backbone as the library builds it against each CPU formulation turned off and against
  a git revision's backbone (here HEAD), in the trainer's step; and single layers' weight
  gradients. A ResNet-18 of width 32: its last stage (256 channels) takes the patch gradient."""
  in_git = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True)
  against = ["--against", "HEAD"] if in_git.returncode == 0 else []
  args = ("--models", "resnet18", "--width", "32", "--image_size", "16", "--batch", "4")
  result, stdout = _run(
    "cpu_kernels", tmp_path, *args, "--off", "patch_grad", "--rounds", "1", *against
  )
  (row,) = result["rows"]
  assert set(row["speedup_of_today"]) == {"patch_grad=False"} | set(against[1:])
  assert all(r > 0 for r in row["speedup_of_today"].values())
  convs = {v: s["hlo_ops"]["convolution"] for v, s in row["compiled"].items()}
  # The last stage's four 3x3 convolutions (256 channels) compute their weight gradients as dots.
  assert convs["patch_grad=False"] == convs["today"] + 4
  assert "today" in stdout and result["machine"]["nproc"] > 0


def test_map_sources_smoke(tmp_path):
  result, stdout = _run("map_sources", tmp_path, "--num_train", "40", "--image_size", "32")
  assert [r["source"] for r in result["rows"]] == ["pca", "lda"]
  assert all(r["images"] == 40 and r["seconds"] > 0 for r in result["rows"])
  assert "pca: 40 images at 32 px" in stdout and result["machine"]["nproc"] >= 1


def test_controls_table_reads_the_two_sweeps(tmp_path):
  def entry(key, weight):
    term = key.split("_")[0]
    return {
      "grid": [
        {"weights": {term: w}, "val_mean": 0.6 + w / 100, "val_std": 0.01, "n": 5}
        for w in (0.1, weight)
      ],
      "chosen": {term: weight},
      "test_auroc_mean": 0.7,
      "test_auroc_std": 0.05,
      "test_alignment_pe_mean": 0.3,
      "test_alignment_pe_std": 0.02,
    }

  for name, keys, weight in (
    ("W", ["cyborg", "cyborg_shuffled", "margin_inverted"], 10.0),
    ("P", ["cyborg"], 1.0),
  ):
    (tmp_path / name).mkdir()
    methods = {key: entry(key, weight) for key in keys}
    (tmp_path / name / "sweep.json").write_text(json.dumps({"methods": methods}))
  result, stdout = _run(
    "controls_table", tmp_path, "--controls", str(tmp_path / "W"), "--pca", str(tmp_path / "P")
  )
  assert [(r["method"], r["maps"], r["weight"]) for r in result["rows"]] == [
    ("cyborg", "true maps", 10.0),
    ("cyborg", "shuffled", 10.0),
    ("cyborg", "PCA maps (no human map)", 1.0),
    ("margin", "inverted", 10.0),
  ]
  assert "| cyborg | shuffled | 10 | 0.70 ± 0.01 | 0.70 ± 0.05 | 0.30 ± 0.02 |" in stdout
  iou = result["control_iou"]  # the built-in iris sits near the centre: shuffled maps overlap
  assert iou["inverted"] == 0 and 0 < iou["random"] < iou["shuffled"] < 1, iou
