r"""Every GPU benchmark in ONE command, for a bare accelerator machine (no network), in < 10 min.

Everything it times runs through the trainer's own dispatch (`loop.Dispatcher`, via
`common.dispatch_runner` and `throughput.py`'s runners), so the figures are those of the
steps users train with.

    # any machine with a GPU, the package and JAX's CUDA plugin installed
    # (pip install -e . 'jax[cuda12]==0.10.2'), from the repository root:
    python benchmarks/gpu.py --out results/gpu
    # a bare machine without network (this project's device tool), in two steps:
    # here, once: the wheels the GPU machine lacks (ml_collections, clu, tensorflow-datasets, ...)
    bash benchmarks/gpu_wheels.sh
    # there (the device tool's run, carry=[".whl"]):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT
    # what did not fit in the first run's budget (gpu.md names the parts to pass):
    ... python3 benchmarks/gpu.py --out $OUT --parts resnet50/float32,densenet121/float32
    # smoke test on a CPU (tests/test_benchmarks.py): tiny model, 32 px, 1 step per round
    python benchmarks/gpu.py --platform cpu --smoke --out /tmp/gpu_smoke

The device tool's call (after `bash benchmarks/gpu_wheels.sh` here; .whl/ is git-ignored, 9.6 MB):

    run(kind="nvidia-h100-x1", timeout_s=600, carry=[".whl"], command="python3 -m pip install
        -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT")

(one line). It returns gpu.json, gpu.md and gpu_log.txt. The default budget (540 s) usually
covers the first parts (ResNet-50 bf16, its PyTorch peer, DenseNet-121 bf16); gpu.md ends with
the `--parts` list of what did not fit, for a second call.

Parts, run in this order while the time budget (``--budget_s``, from this script's start) lasts,
each in its own process (clean device memory; a failing part does not stop the others):

* ``MODEL/DTYPE`` (ResNet-50 and DenseNet-121 at 224 px, bfloat16 and float32; ViT-S/16 with the
  GAP head, bfloat16, last): the trainer's
  train step (`config_base.base()` + the ``accel`` variant's input settings, the method set by
  `config_base.set_method`, `state.build` + `state.create_state`, `step.make_train_step`) for CE
  and each dual-CAM loss (cyborg, difference, opposition, margin) at a batch that fills the
  device (per model and dtype; halved on out-of-memory, at most twice), step-only on a batch
  already on the device; plus, for ``--e2e_method`` (difference), end-to-end training from a
  prepared CSV-protocol set in /tmp (`pipeline.train_batches` -> `feed.DevicePrefetch` -> the
  same compiled step), `feed.ResidentData` + `step.make_train_step(resident=True)` (k steps per dispatch)
  and the input path alone (`train_batches`): `throughput.py`'s runners. All variants of a
  part are timed interleaved (rounds in shuffled order); figures are medians, ratios medians of
  per-round ratios.
* ``torch/MODEL/DTYPE``: the PyTorch peer on the same GPU (`torch_compare.py`: torchvision
  model, AMP bf16, channels_last, `torch.compile` when it works; its CAM loss written as
  CYBORG-family code writes it) interleaved with our CE and difference steps at the batch the
  JAX part of that model and dtype used. Skipped cleanly where torch is absent.

Writes ``--out``/gpu.json (every figure, the machine, package versions, skipped parts and why),
``--out``/gpu.md (the summary tables) and ``--out``/gpu_log.txt (all output), after each part,
so a run cut short still returns what it measured.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

METHODS = ("ce", "cyborg", "difference", "opposition", "margin")
DTYPES = ("bfloat16", "float32")
PARTS = (
  "resnet50/bfloat16",
  "torch/resnet50/bfloat16",
  "densenet121/bfloat16",
  "resnet50/float32",
  "densenet121/float32",
  "torch/densenet121/bfloat16",
  "vit_s16/bfloat16",
)
SMOKE_PARTS = ("tiny/bfloat16", "torch/resnet18/float32")
# Batches that fill one H100 (80 GB; XLA preallocates 75%), halved on out-of-memory.
BATCH = {
  ("resnet50", "bfloat16"): 256,
  ("resnet50", "float32"): 256,
  ("densenet121", "bfloat16"): 256,
  ("densenet121", "float32"): 128,
  ("vit_s16", "bfloat16"): 256,
}
# The most of the budget one part may take (seconds), in the priority order of PARTS: a JAX part
# drops its last losses and times fewer rounds to end by then; later parts wait for a next run.
CAP = {"resnet50": 240.0, "densenet121": 300.0, "torch": 300.0, "tiny": 120.0, "vit_s16": 240.0}
MIN_PART_S = 60.0  # a part needs at least this much of the budget to start


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help="folder for gpu.json, gpu.md, gpu_log.txt")
  p.add_argument("--platform", default="", help="'' (JAX's default: the GPU), gpu or cpu")
  p.add_argument("--smoke", action="store_true", help="tiny model, 32 px, 1 step per round")
  p.add_argument("--parts", default="", help=f"comma list; default: {','.join(PARTS)}")
  p.add_argument("--methods", default=",".join(METHODS), help="losses of the JAX parts")
  p.add_argument("--e2e_method", default="difference", help="method of the end-to-end runs")
  p.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget, seconds")
  p.add_argument("--batch", type=int, default=0, help="0: per model and dtype (BATCH)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--rounds", type=int, default=8, help="at most; fewer if time is short")
  p.add_argument("--steps_per_round", type=int, default=10)
  p.add_argument("--resident_k", type=int, default=10, help="0: no ResidentData variant")
  p.add_argument("--n_images", type=int, default=1280, help="CSV set size (80%% train)")
  p.add_argument("--data_dir", default="", help="the CSV set (default: a folder in /tmp)")
  p.add_argument("--no_torch_compile", action="store_true")
  # Internal: run one JAX part in this process and write its JSON.
  p.add_argument("--run_part", default="", help=argparse.SUPPRESS)
  p.add_argument("--part_json", default="", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:
    args.image_size, args.n_images, args.batch = 32, 48, args.batch or 4
    args.rounds, args.steps_per_round, args.resident_k = 2, 1, 1
    if args.methods == ",".join(METHODS):
      args.methods = "ce,difference"
  args.methods = [m for m in args.methods.split(",") if m]
  if "ce" not in args.methods:
    args.methods.insert(0, "ce")
  args.parts = [x for x in args.parts.split(",") if x] or list(SMOKE_PARTS if args.smoke else PARTS)
  for part in args.parts:
    pieces = part.split("/")
    if len(pieces) != (3 if pieces[0] == "torch" else 2) or pieces[-1] not in DTYPES:
      p.error(f"--parts: {part!r} is not MODEL/DTYPE or torch/MODEL/DTYPE (DTYPE: {DTYPES})")
  return args


# --------------------------------------------------------------------------- one JAX part
class OutOfMemory(Exception):
  pass


def part_config(args, model: str, dtype: str, batch: int, method: str):
  """The part's config: the `accel` variant's settings (4 batches ahead), then model, dtype,
  batch, image size and method."""
  from divisive_jax import config_base

  c = common.bench_config(
    model,
    args.image_size,
    batch,
    variant=method,
    dtype=dtype,
    width=4 if model == "tiny" else 0,
    stem="small" if model == "tiny" else "imagenet",
  )
  config_base.apply_variants(c, "accel", quick=None)
  c.model.dtype, c.batch_size = dtype, batch
  return c


def run_jax_part(args, model: str, dtype: str, batch: int, deadline: float, log) -> dict:
  import throughput
  from divisive_jax import sharding

  steps = args.steps_per_round
  config = part_config(args, model, dtype, batch, "ce")
  setup_ce = common.train_setup(config)
  try:
    from divisive_jax.data import pipeline  # tensorflow-datasets and array_record

    splits, data_timings = throughput.prepared_data(config, args.data_dir, args.n_images)
    source = splits.train
    first = pipeline.train_batches(source, batch, seed=1)
    host = next(first)
    first.close()
  except Exception as e:  # e.g. the data layer's packages missing: time the steps alone
    source, data_timings = None, {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    host = common.uint8_batch(batch, args.image_size)
    log(f"[{model}/{dtype}] no CSV data ({data_timings['error'][:200]}): step-only figures")
  dev_batch = sharding.to_global(host, setup_ce.mesh)
  state0 = common.create_state(setup_ce)
  limit = common.device_memory_bytes()
  fns, examples, rows, first_s, skipped = {}, {}, {}, {}, []
  compile_max = 0.0
  order = ["ce", args.e2e_method] + [m for m in args.methods if m not in ("ce", args.e2e_method)]
  for method in order:
    left = deadline - time.time()
    if method != "ce" and left < 1.3 * compile_max + 2 * sum(first_s.values()) + 10:
      skipped.append({"variant": method, "reason": f"time ({left:.0f}s left)"})
      continue
    setup = (
      setup_ce
      if method == "ce"
      else common.train_setup(part_config(args, model, dtype, batch, method))
    )
    state = common.state_for(state0, setup)
    try:
      run, compiled, compile_s = common.dispatch_runner(
        setup, state, common.Repeat(dev_batch), steps
      )
      stats = common.compiled_stats(compiled)
      need = stats.get("xla_peak_mb", 0.0) * 2**20
      if limit and need > limit:
        raise OutOfMemory(f"XLA needs {need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB")
      t0 = time.perf_counter()
      metrics = run()
      loss = float(metrics["loss"])
      first_s[f"step/{method}"] = time.perf_counter() - t0
    except Exception as e:
      if isinstance(e, OutOfMemory) or common.is_oom(e):
        raise OutOfMemory(str(e)[:400]) from None
      raise
    compile_max = max(compile_max, compile_s)
    stats.pop("hlo_ops", None)
    rows[method] = {"variant": method, "compile_s": compile_s, "first_loss": loss, **stats}
    fns[f"step/{method}"], examples[f"step/{method}"] = run, steps * batch
    log(f"[{model}/{dtype} b{batch}] compiled {method} in {compile_s:.1f}s, loss {loss:.4f}")
    if method == args.e2e_method and source is not None:
      e2e = throughput.end_to_end_runner(
        setup, common.state_for(state0, setup), source, steps, compiled
      )
      fns["end_to_end"], examples["end_to_end"] = e2e, steps * batch
      e2e_setup = setup
  if source is not None:
    fns["input"] = throughput.input_runner(source, batch, steps)
    examples["input"] = steps * batch
  resident_note = "off"
  if args.resident_k > 0 and "end_to_end" in fns:
    left = deadline - time.time()
    if not throughput.fits_on_device(source):
      resident_note = "skipped: the training split does not fit"
    elif left < 1.3 * compile_max + 2 * sum(first_s.values()) + 10:
      resident_note = f"skipped: time ({left:.0f}s left)"
    else:
      k = min(args.resident_k, steps)
      run, resident_compile_s, n = throughput.resident_runner(
        e2e_setup, common.state_for(state0, e2e_setup), source, batch, k, steps, log=log
      )
      fns["resident"], examples["resident"] = run, n * batch
      resident_note = f"{k} steps per dispatch, compiled in {resident_compile_s:.1f}s"

  # Timing: one warm-up round (timed, to size the rest), then as many rounds as fit.
  t0 = time.perf_counter()
  try:
    common.interleaved(fns, rounds=1, warmup=0, seed=1)
  except Exception as e:  # the prefetched and resident copies need a little more memory
    if common.is_oom(e):
      raise OutOfMemory(str(e)[:400]) from None
    raise
  round_s = time.perf_counter() - t0
  left = deadline - time.time() - 5
  rounds = int(max(2, min(args.rounds, left // max(round_s, 1e-3))))
  log(f"[{model}/{dtype} b{batch}] warm-up round {round_s:.1f}s; timing {rounds} rounds")
  times = common.interleaved(fns, rounds=rounds, warmup=0, log=log)
  per_round = {name: [examples[name] / t for t in ts] for name, ts in times.items()}
  ratio = common.ratios({m: times[f"step/{m}"] for m in rows}, "ce")
  for method, r in rows.items():
    ts = times[f"step/{method}"]
    lo, hi = common.ratio_iqr(ts, times["step/ce"])
    r.update(
      step_ms=common.median(ts) / steps * 1e3,
      images_per_s=common.median(per_round[f"step/{method}"]),
      ratio_to_ce=ratio[method],
      ratio_q25=lo,
      ratio_q75=hi,
      flops_ratio_to_ce=r.get("flops", 0) / rows["ce"]["flops"]
      if rows["ce"].get("flops")
      else None,
    )
  ref = per_round.get(f"step/{args.e2e_method}")
  over = lambda name: common.median([a / b for a, b in zip(per_round[name], ref)]) if ref else None
  result = {
    "kind": "jax",
    "model": model,
    "dtype": dtype,
    "batch": batch,
    "image_size": args.image_size,
    "rounds": rounds,
    "steps_per_round": steps,
    "prefetch": int(config.data.prefetch),
    "rows": list(rows.values()),
    "skipped_variants": skipped,
    "input_examples_per_s": common.median(per_round["input"]) if "input" in fns else None,
    "end_to_end_method": args.e2e_method,
    "resident": resident_note,
    "device_peak_mb": common.device_peak_mb(),
    "data": data_timings,
    "examples_per_s_per_round": per_round,
  }
  if "end_to_end" in per_round:
    result["end_to_end_examples_per_s"] = common.median(per_round["end_to_end"])
    result["end_to_end_over_step"] = over("end_to_end")
  if "resident" in per_round:
    result["resident_examples_per_s"] = common.median(per_round["resident"])
    result["resident_over_step"] = over("resident")
  return result


def child_main(args) -> None:
  """Run the JAX part ``args.run_part`` (MODEL/DTYPE) here; write its JSON to part_json."""
  common.use_platform(args.platform, 1)
  import jax

  from divisive_jax import writers

  writers.quiet_library_logs()
  model, dtype = args.run_part.split("/")
  batch = args.batch or BATCH.get((model, dtype), 32)
  out = {"part": args.run_part, "machine": common.machine_info(), "batches_tried": []}
  log = lambda s: print(s, flush=True)
  for _ in range(3):  # the batch, then half of it, then a quarter
    out["batches_tried"].append(batch)
    try:
      out.update(run_jax_part(args, model, dtype, batch, args.deadline, log))
      out["status"] = "ok"
      break
    except OutOfMemory as e:
      log(f"[{args.run_part}] out of memory at batch {batch}: {str(e)[:200]}; halving")
      out["status"], out["error"] = "oom", str(e)
      batch //= 2
      jax.clear_caches()
      gc.collect()
      if batch < 1:
        break
  from divisive_jax import jsonio

  jsonio.write_json(args.part_json, out)


# ------------------------------------------------------------------------------- the driver
def run_logged(cmd, timeout: float, log_file) -> tuple[object, str]:
  """Run ``cmd`` (its own process group), echoing its output here and to ``log_file``; kill
  the group at ``timeout``. Returns (exit code or 'timeout', the last lines of output)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
    cmd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env,
    start_new_session=True,
  )
  tail = collections.deque(maxlen=30)

  def pump():
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      log_file.write(line)
      tail.append(line)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    rc = proc.wait(timeout=max(timeout, 1.0))
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (torch's compile workers)
    proc.wait()
    rc = "timeout"
  reader.join(timeout=10)
  log_file.flush()
  return rc, "".join(tail)


def torch_part(args, model: str, dtype: str, batch: int, budget: float, tmp: str, log_file):
  out_json = os.path.join(tmp, f"torch_{model}_{dtype}.json")
  device = "cpu" if args.platform == "cpu" else "cuda"
  steps = 2 if args.smoke else 20
  cmd = [sys.executable, os.path.join(HERE, "torch_compare.py"), "--model", model]
  cmd += ["--image_size", str(args.image_size), "--batch", str(batch), "--dtype", dtype]
  cmd += ["--device", device, "--steps", str(steps), "--inner", "1" if args.smoke else "5"]
  cmd += ["--warmup", "0" if args.smoke else "1", "--quiet", "--json", out_json]
  compiled = device == "cuda" and not args.no_torch_compile and budget >= 200
  cmd += ["--channels_last"] + (["--compile"] if compiled else [])
  rc, tail = run_logged(cmd, budget, log_file)
  result = {"kind": "torch", "model": model, "dtype": dtype, "batch": batch, "exit": rc}
  if os.path.exists(out_json):
    with open(out_json) as f:
      result.update(json.load(f))
  if rc != 0:
    result.update(status="failed", error=tail[-3000:])
  else:
    result["status"] = "skipped" if result.get("skipped") else "ok"
  if not compiled and device == "cuda":
    result["torch_compile_note"] = "not tried (--no_torch_compile or under 200 s of budget)"
  return result


def nvidia_smi() -> str | None:
  if not shutil.which("nvidia-smi"):
    return None
  query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
  try:
    out = subprocess.run(
      ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
    )
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def summary_markdown(report: dict) -> str:
  lines = [
    f"# GPU benchmarks ({report['device'] or report['machine'].get('device_kind', '?')})",
    "",
    f"jax {report['machine'].get('jax')} on {report['machine'].get('backend')}; "
    f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; medians over rounds, "
    "ratios are medians of per-round ratios (variants interleaved).",
    "",
  ]
  jax_parts = [p for p in report["parts"] if p.get("kind") == "jax" and p.get("status") == "ok"]
  if jax_parts:
    head = ["part", "batch", "CE img/s"] + [f"{m}/CE" for m in METHODS[1:]]
    head += ["end-to-end/step", "resident/step", "input ex/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in jax_parts:
      rows = {r["variant"]: r for r in p["rows"]}
      cells = [p["part"], p["batch"], rows["ce"]["images_per_s"]]
      cells += [rows[m]["ratio_to_ce"] if m in rows else None for m in METHODS[1:]]
      cells += [p.get("end_to_end_over_step"), p.get("resident_over_step")]
      cells += [p["input_examples_per_s"]]
      lines.append("| " + " | ".join(common.fmt(c) for c in cells) + " |")
    lines.append("")
  torch_parts = [p for p in report["parts"] if p.get("kind") == "torch" and p.get("rows")]
  if torch_parts:
    lines += [
      "| PyTorch peer | variant | batch | ours img/s | PyTorch img/s | ours/PyTorch | compiled |",
      "|---|---|---|---|---|---|---|",
    ]
    for p in torch_parts:
      for r in p["rows"]:
        cells = [p["part"], r["variant"], r["batch"], r["jax_images_per_s"]]
        cells += [r["torch_images_per_s"], r["ours_over_torch_images_per_s"], r["torch_compiled"]]
        lines.append("| " + " | ".join(common.fmt(c) for c in cells) + " |")
    lines.append("")
  for p in report["parts"]:
    if p.get("status") not in ("ok",):
      lines.append(f"* {p['part']}: {p.get('status')} {str(p.get('error', ''))[-300:]}")
  if report["skipped_parts"]:
    lines.append(
      "* not run (budget): " + ", ".join(s["part"] for s in report["skipped_parts"]) + "; run "
      f"them with `--parts {','.join(s['part'] for s in report['skipped_parts'])}`"
    )
  return "\n".join(lines) + "\n"


def driver_main(args) -> dict:
  start = time.time()
  deadline = start + args.budget_s
  os.makedirs(args.out, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="gpu_bench_parts_")
  if not args.data_dir:
    args.data_dir = os.path.join(
      tempfile.gettempdir(), f"divisive_jax_gpu_bench_{args.image_size}px_{args.n_images}"
    )
  log_file = open(os.path.join(args.out, "gpu_log.txt"), "w")

  def say(msg):
    print(msg, flush=True)
    log_file.write(msg + "\n")
    log_file.flush()

  import throughput

  if not os.path.exists(os.path.join(args.data_dir, "protocol.csv")):
    t0 = time.perf_counter()
    throughput.write_dataset(args.data_dir, args.n_images, args.image_size)
    say(f"wrote {args.n_images} images ({args.image_size} px) in {time.perf_counter() - t0:.1f}s")
  report = {
    "benchmark": "gpu",
    "args": {k: v for k, v in vars(args).items() if k not in ("run_part", "part_json")},
    "device": nvidia_smi(),
    "machine": {"packages": common.package_versions(), "nproc": os.cpu_count()},
    "budget_s": args.budget_s,
    "parts": [],
    "skipped_parts": [],
  }
  say(f"device: {report['device']}; packages: {report['machine']['packages']}")
  min_part = 0.0 if args.smoke else MIN_PART_S
  for part in args.parts:
    left = deadline - time.time()
    if left < min_part:
      report["skipped_parts"].append({"part": part, "reason": f"budget ({left:.0f}s left)"})
      say(f"=== {part}: skipped, {left:.0f}s of the budget left")
      continue
    part_deadline = time.time() + min(left, CAP.get(part.split("/")[0], 240.0))
    say(f"=== {part}: until {part_deadline - time.time():.0f}s from now ({left:.0f}s left)")
    t0 = time.time()
    pieces = part.split("/")
    if pieces[0] == "torch":
      model, dtype = pieces[1], pieces[2]
      done = [p for p in report["parts"] if p.get("model") == model and p.get("dtype") == dtype]
      batch = next((p["batch"] for p in done if p.get("kind") == "jax" and "batch" in p), None)
      batch = batch or args.batch or BATCH.get((model, dtype), 32)
      # torch and JAX share the GPU here; the JAX-only parts used the whole of it
      result = torch_part(args, model, dtype, batch, part_deadline - time.time(), tmp, log_file)
      if result["status"] == "failed" and common.is_oom(Exception(result.get("error", ""))):
        left = part_deadline - time.time()
        if left >= min_part and batch > 1:  # both frameworks on one GPU: try half the batch
          say(f"=== {part}: out of memory at batch {batch}; again at {batch // 2}")
          result = torch_part(args, model, dtype, batch // 2, left, tmp, log_file)
          result["batches_tried"] = [batch, batch // 2]
    else:
      part_json = os.path.join(tmp, part.replace("/", "_") + ".json")
      cmd = [sys.executable, os.path.abspath(__file__), "--run_part", part]
      cmd += ["--part_json", part_json, "--deadline", str(part_deadline), "--out", args.out]
      cmd += ["--platform", args.platform, "--data_dir", args.data_dir]
      cmd += ["--image_size", str(args.image_size), "--n_images", str(args.n_images)]
      cmd += ["--rounds", str(args.rounds), "--steps_per_round", str(args.steps_per_round)]
      cmd += ["--resident_k", str(args.resident_k), "--batch", str(args.batch)]
      cmd += ["--methods", ",".join(args.methods), "--e2e_method", args.e2e_method]
      # The part ends itself by part_deadline; the kill comes later, never after the budget.
      rc, tail = run_logged(cmd, min(part_deadline + 60, deadline) - time.time(), log_file)
      result = {"kind": "jax"}
      if os.path.exists(part_json):
        with open(part_json) as f:
          result.update(json.load(f))
      if rc != 0:
        result.update(status="failed" if rc != "timeout" else "timeout", error=tail[-3000:])
      if "machine" in result and "jax" in result["machine"]:
        report["machine"].update(result.pop("machine"))
    result.update(part=part, seconds=time.time() - t0)
    report["parts"].append(result)
    report["elapsed_s"] = time.time() - start
    write_report(args.out, report)
    say(f"=== {part}: {result.get('status')} in {result['seconds']:.0f}s")
  report["elapsed_s"] = time.time() - start
  write_report(args.out, report)
  print(summary_markdown(report))
  log_file.close()
  shutil.rmtree(tmp, ignore_errors=True)
  return report


def write_report(out: str, report: dict) -> None:
  report.setdefault("elapsed_s", 0.0)
  from divisive_jax import jsonio

  jsonio.write_json(os.path.join(out, "gpu.json"), report)
  with open(os.path.join(out, "gpu.md"), "w") as f:
    f.write(summary_markdown(report))


def main(argv=None):
  args = parse_args(argv)
  if args.run_part:
    return child_main(args)
  return driver_main(args)


if __name__ == "__main__":
  main()
