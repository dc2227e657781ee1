r"""The real train step compiled for a GPU or a TPU pod this machine does not have (XLA ahead of
time, on the CPU).

    pip install -e '.[cuda]' (or '.[tpu]')  # jax's CUDA plugin and ptxas / libtpu; no device
    python benchmarks/aot.py --target h100_sxm --json benchmarks/results/aot_h100_sxm.json \
        --md benchmarks/results/aot_h100_sxm.md
    python benchmarks/aot.py --target v5e:16x16 --batch 8192 --models resnet50 --methods ce,difference
    python benchmarks/aot.py --target h200 --models tiny --image_size 64 --methods ce,difference

A GPU target is ``benchmarks/targets/<name>.txtpb`` (XLA's ``GpuTargetConfig`` spec of that GPU,
its source named in the file); a TPU target is a topology ``<generation>:<shape>`` (``v5e:16x16``
= 256 chips, ``v4:4x4x4`` = 64, ``v5p:4x4x4`` = 64; `TPUS` holds each generation's figures and
their source), whose chips libtpu describes without a TPU. For each config variant (``--models``, ``--dtype`` bfloat16 = the
``accel`` variant's compute or float32, ``--methods``, ``--batch``, ``--devices``,
``--population`` and ``--strategy``), the step is built exactly as training builds it
(`config_base`, `state.build`, `loop.Dispatcher` -> `step.make_train_step` with the config's
input settings), on a mesh of the topology's devices, lowered for the abstract state and a
uint8 batch, and compiled for the target here, on the CPU. Reported per variant (JSON and a
markdown table):

* memory: XLA's memory analysis, arguments + outputs - aliased + temp, against the device's
  memory; with ``--fit``, the largest global batch (and population) that fits, found by
  compiling (doubling, then bisection);
* convolutions and gemms by library call and dtype, from the optimized HLO (cuDNN
  ``__cudnn$conv*``, cuBLAS ``__cublas$*``; dots and convolutions XLA emits itself counted too):
  with bfloat16 compute every convolution of the backbone should be bf16, the CAMs and losses
  float32 (their convolutions are the model's: what is float32 is said);
* host traffic: host callbacks, infeed/outfeed and host send/recv in the optimized HLO (the step
  should have none);
* FLOPs and bytes accessed, and a lower bound per step: FLOPs / peak matrix FLOP/s of the
  compute dtype, and for a TPU max(that, bytes / HBM bandwidth), labelled a bound: nothing is
  autotuned or run without the device, these programs are for checks, not timings;
* collectives (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all) by kind:
  count and bytes per step, and a bound: bytes / the chip's interconnect bandwidth (TPU);
* each method's step against the CE step on the same target: FLOPs and memory ratios;
* ``--methods ...,eval``: the evaluation step too (`step.make_eval_step`, what validation and the
  final evaluation run: logits and both classes' CAMs; one member, a batch of twice ``--batch``,
  the ``accel`` variant's ratio).

FLOPs and bytes: for a TPU the compiled program's cost analysis (per chip); for a GPU, whose
compiled program reports none without a device, XLA's HloCostAnalysis of the same step lowered
for CPU devices (the unoptimised module).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
# XLA PrimitiveType numbers of the matrix-unit rates in a target spec.
DTYPE_KEY = {"bfloat16": 16, "float32": 11, "float16": 10}
# Fields of the spec files this jaxlib's GpuTargetConfigProto does not know.
UNKNOWN_FIELDS = ("collective_memory_granularity",)
# Per chip, from Google Cloud's TPU pages (peak bf16 FLOP/s, HBM bytes and bytes/s, bidirectional
# interconnect bytes/s): how libtpu names the chip config, and which axes of a topology wrap.
_DOCS = "https://docs.cloud.google.com/tpu/docs/"
TPUS = {
  "v5e": dict(
    name="TPU v5e",
    memory_bytes=16 * 2**30,
    memory_bandwidth=819e9,
    bf16=197e12,
    ici=400e9,
    source=_DOCS + "v5e",
    chip_config="default",
    wrap=(True, True, False),
  ),
  "v4": dict(
    name="TPU v4",
    memory_bytes=32 * 2**30,
    memory_bandwidth=1200e9,
    bf16=275e12,
    ici=None,
    source=_DOCS + "v4",
    chip_config="megacore",
    wrap=(True, True, True),
  ),
  "v5p": dict(
    name="TPU v5p",
    memory_bytes=95 * 2**30,
    memory_bandwidth=2765e9,
    bf16=459e12,
    ici=1200e9,
    source=_DOCS + "v5p-training",
    chip_config="megacore",
    wrap=(True, True, True),
  ),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--target", default="h100_sxm", help="a file of benchmarks/targets/ (no suffix), or v5e:16x16"
  )
  p.add_argument("--models", default="resnet50,densenet121")
  p.add_argument(
    "--methods",
    default="ce,cyborg,difference,opposition,margin",
    help="train steps of these losses; 'eval': the evaluation step (CAMs of both classes)",
  )
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=128, help="global batch (the accel variant's)")
  p.add_argument("--devices", type=int, default=1, help="GPUs of the topology (one host)")
  p.add_argument("--population", default="1", help="members, comma-separated (e.g. 1,8)")
  p.add_argument("--strategy", default="vmap", choices=("vmap", "unroll"))
  p.add_argument("--fit", action="store_true", help="find the largest batch that fits")
  p.add_argument(
    "--bn_group", default="0", help="BatchNorm groups, comma-separated (0: all devices; 8,0)"
  )
  p.add_argument("--json", default="")
  p.add_argument("--md", default="")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  args.methods = [m for m in args.methods.split(",") if m]
  args.population = [int(x) for x in args.population.split(",") if x]
  args.bn_group = [int(x) for x in args.bn_group.split(",") if x]
  return args


# ------------------------------------------------------------------------------------ target
def read_target(name: str) -> tuple[str, dict]:
  """(the spec text this jaxlib accepts, its figures: name, memory, bandwidth, peak FLOP/s);
  for a TPU topology, (the topology, the generation's figures)."""
  if ":" in name:
    gen = name.split(":")[0]
    if gen not in TPUS:
      raise SystemExit(f"--target {name}: unknown TPU generation {gen!r}; known: {sorted(TPUS)}")
    t = TPUS[gen]
    figures = dict(
      name=f"{t['name']} {name.split(':')[1]}",
      memory_bytes=t["memory_bytes"],
      memory_bandwidth=t["memory_bandwidth"],
      peak_flops={"bfloat16": t["bf16"], "float32": None, "float16": None},
      interconnect_bandwidth=t["ici"],
      spec=t["source"],
      platform="tpu",
    )
    return name, figures
  path = os.path.join(TARGETS, f"{name}.txtpb")
  if not os.path.exists(path):
    known = sorted(f[: -len(".txtpb")] for f in os.listdir(TARGETS) if f.endswith(".txtpb"))
    raise SystemExit(f"--target {name}: no {path}; known targets: {', '.join(known)}")
  with open(path) as f:
    lines = [ln for ln in f if not ln.strip().startswith(UNKNOWN_FIELDS)]
  text = "".join(lines)

  def field(key, cast=float):
    return cast(re.search(rf"^\s*{key}: (\S+)", text, re.M).group(1).strip('"'))

  cores = field("core_count", int)
  peak = {}
  block = text[text.index("matrix_unit_description") :]
  for key, clock, units, ops in re.findall(
    r"key: (\d+)\s+value \{\s+clock_rate_ghz: ([\d.]+)\s+units_per_core: (\d+)\s+ops_per_clock: "
    r"(\d+)",
    block,
  ):
    # A matrix unit's op is a multiply-add: 2 FLOPs.
    peak[int(key)] = 2 * float(clock) * 1e9 * int(units) * int(ops) * cores
  figures = {
    "name": re.search(r'^\s*name: "([^"]+)"', text, re.M).group(1),
    "memory_bytes": field("device_memory_size", int),
    "memory_bandwidth": field("memory_bandwidth"),
    "peak_flops": {dt: peak.get(k) for dt, k in DTYPE_KEY.items()},
    "spec": os.path.relpath(path, common.REPO),
    "interconnect_bandwidth": None,
    "platform": "cuda",
  }
  return text, figures


def target_mesh(text: str, devices: int, bn_group: int = 0):
  """A ('data',) mesh of ``devices`` devices of the target's topology (one host); for a TPU
  topology ``text`` (``v5e:16x16``), every chip of it."""
  from jax.experimental import topologies

  from divisive_jax import sharding

  if ":" in text and "\n" not in text:
    t = TPUS[text.split(":")[0]]
    topo = topologies.get_topology_desc(
      topology_name=text,
      platform="tpu",
      chip_config_name=t["chip_config"],
      chips_per_host_bounds=(2, 2, 1),
      num_slices=1,
      wrap=t["wrap"],
    )
    return sharding.make_mesh(list(topo.devices), bn_group)

  topo = topologies.get_topology_desc(
    platform="cuda", target_config=text, topology=f"1x1x{devices}"
  )
  return sharding.make_mesh(list(topo.devices), bn_group)


# ------------------------------------------------------------------------------------- steps
def config_for(model: str, method: str, dtype: str, image_size: int, batch: int):
  """The trainer's config of a variant: `config_base.base()` with the model, the method and
  the ``accel`` variant's input settings (bfloat16 compute when ``dtype`` says so)."""
  from divisive_jax import config_base

  c = config_base.base()
  config_base.apply_variants(c, "accel" if dtype == "bfloat16" else "", lambda c: None)
  config_base.set_method(c, method)
  c.model.name = model
  c.model.width = common.default_width(model)
  c.model.stem = "small" if model == "tiny" else "imagenet"
  c.data.image_size = image_size
  c.batch_size = batch
  return c


def lowered_step(config, mesh, members: int, strategy: str, kind: str = "train"):
  """The train step of ``members`` runs as the trainer builds it (`loop.train_step`, what
  `loop.Dispatcher` runs), lowered for abstract arguments on ``mesh`` (nothing is computed);
  ``kind='eval'``: the evaluation step the trainer's validation runs and the final evaluation
  use (`train.Job.eval_step`: `step.make_eval_step`, one member, a batch of the config's
  ``eval_batch_size``)."""
  import dataclasses

  import jax
  import numpy as np

  from divisive_jax import loop, sharding, state

  # Built for this machine's devices, then given the target's mesh (its BatchNorm groups).
  here = config.copy_and_resolve_references()
  here.model.bn_group = 0
  setup = dataclasses.replace(state.build(here, 100, 1000), config=config, mesh=mesh)
  abstract = state.abstract_state(setup)
  if members > 1:
    rep = sharding.replicated(mesh)
    abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((members,) + s.shape, s.dtype, sharding=rep), abstract
    )
  n, size = int(config.batch_size), int(config.data.image_size)
  if kind == "eval":
    n = int(config.eval_batch_size) or n
  batch_spec = sharding.batch_sharding(mesh)
  shapes = {
    "image": ((n, size, size, int(config.data.channels)), np.uint8),
    "label": ((n,), np.int32),
    "saliency": ((n, size, size), np.uint8),
    "has_saliency": ((n,), np.float32),
    "valid": ((n,), np.float32),
  }
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_spec) for k, (s, d) in shapes.items()}
  if kind == "eval":
    from divisive_jax import preprocess, step

    c = config
    inputs = preprocess.from_config(c.data)
    fn = step.make_eval_step(setup.model, mesh, c.loss.cam_kind, c.loss.cam_relu, inputs)
    return fn.lower({"params": abstract.params, "batch_stats": abstract.batch_stats}, batch)
  return loop.train_step(setup, members, strategy).lower(abstract, batch)


_CUSTOM = re.compile(r'custom_call_target="([^"]+)"')
_RESULT = re.compile(r"^\(?([a-z]+\d*)\[")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_LIBRARY = {
  "__cudnn$convForward": "cudnn conv forward",
  "__cudnn$convBackwardInput": "cudnn conv backward-input",
  "__cudnn$convBackwardFilter": "cudnn conv backward-filter",
  "__cudnn$convBiasActivationForward": "cudnn conv forward (fused)",
}


def _where(op_name: str) -> str:
  """Which part of the step an op belongs to, from its source (the model's scopes)."""
  if "backbone" in op_name:
    return "backbone"
  if "head" in op_name or "cnk,nhwk" in op_name:
    return "head and CAMs"
  return "losses and the rest"


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "bf16": 2,
  "f16": 2,
  "pred": 1,
}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _bytes(result_type: str) -> int:
  """Bytes of an HLO result type (an array or a tuple of arrays)."""
  total = 0
  for dtype, dims in _ARRAY.findall(result_type):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dtype, 4)
  return total


def _group_size(rhs: str) -> str:
  """Devices in each replica group of a collective (``{{0,1},{2,3}}`` or ``[2,2]<=[4]``: 2)."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rhs)
  if m:
    return str(len(m.group(1).split(",")))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", rhs)
  return m.group(2) if m else "all"


def collectives(text: str) -> dict:
  """{kind: {"count", "bytes", "devices_per_group": {size: count}}} of an optimized HLO
  module's collectives (async ones counted once, at their start; bytes: the result's, per
  device; the size of their replica groups, where BatchNorm groups show; the dtypes they carry:
  a gradient all-reduced in bf16 shows here)."""
  out = {}
  for line in text.splitlines():
    _, eq, rhs = line.partition(" = ")
    for kind in _COLLECTIVES:
      m = re.search(rf"\s{kind}(-start)?\(", rhs)
      if eq and m:
        entry = out.setdefault(
          kind, {"count": 0, "bytes": 0, "devices_per_group": {}, "dtypes": {}}
        )
        entry["count"] += 1
        for dtype, dims in _ARRAY.findall(rhs[: m.start()]):  # bytes each dtype carries
          entry["dtypes"][dtype] = entry["dtypes"].get(dtype, 0) + _bytes(f"{dtype}[{dims}]")
        size = _group_size(rhs)
        entry["devices_per_group"][size] = entry["devices_per_group"].get(size, 0) + 1
        entry["bytes"] += _bytes(rhs[: m.start()]) // (
          2 if m.group(1) and kind != "all-reduce" else 1
        )
        break
  return out


def hlo_census(text: str) -> dict:
  """Convolutions and matrix products of an optimized HLO module by library call (cuDNN,
  cuBLAS) or XLA op, result dtype and part of the step; and its host traffic (host
  callbacks, infeed/outfeed, send/recv: the step should have none)."""
  kinds, host = collections.Counter(), collections.Counter()
  for line in text.splitlines():
    _, eq, rhs = line.partition(" = ")
    if not eq:
      continue
    result = _RESULT.match(rhs)
    dtype = result.group(1) if result else "?"
    target = (_CUSTOM.search(rhs) or [None, ""])[1]
    where = _where((_OP_NAME.search(rhs) or [None, ""])[1])
    if target.startswith("__cudnn$conv"):
      kinds[f"{_LIBRARY.get(target, target)} {dtype} ({where})"] += 1
    elif target.startswith("__cublas"):
      kinds[f"cublas {target.split('$')[-1]} {dtype} ({where})"] += 1
    elif re.search(r"\b(convolution|dot)\(", rhs):
      kinds[f"xla {'convolution' if 'convolution(' in rhs else 'dot'} {dtype} ({where})"] += 1
    if "callback" in target:
      host["host callback " + target] += 1
    for op in ("infeed", "outfeed", "send", "recv"):
      if re.search(rf"\b{op}\(", rhs):
        host[op] += 1
  return {
    "kinds": dict(sorted(kinds.items())),
    "host_ops": dict(host),
    "collectives": collectives(text),
  }


def cost_on_cpu(config, members: int, strategy: str, devices: int, kind: str = "train") -> dict:
  """XLA's HloCostAnalysis of the same step lowered on CPU devices (the unoptimized module;
  the program compiled for a GPU target reports no cost without a device)."""
  import jax

  from divisive_jax import sharding

  mesh = sharding.make_mesh(jax.devices()[:devices], config.model.bn_group)
  low = lowered_step(config, mesh, members, strategy, kind)
  cost = low.cost_analysis() or {}
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def compile_variant(config, mesh, members: int, strategy: str, target: dict, kind="train") -> dict:
  """Compile a variant for the target; its memory, HLO census, cost and roofline bound."""
  t0 = time.perf_counter()
  compiled = lowered_step(config, mesh, members, strategy, kind).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )
  tpu = target["platform"] == "tpu"
  if tpu:
    cost = compiled.cost_analysis() or {}  # per chip
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  else:
    cost = cost_on_cpu(config, members, strategy, mesh.devices.size, kind)
  flops, nbytes = float(cost.get("flops", "nan")), float(cost.get("bytes accessed", "nan"))
  peak_flops = target["peak_flops"][config.model.dtype]
  census = hlo_census(compiled.as_text())
  coll_bytes = sum(c["bytes"] for c in census["collectives"].values())
  ici = target.get("interconnect_bandwidth")
  return {
    "compile_s": seconds,
    "peak_bytes": peak,
    "peak_gib": peak / 2**30,
    "fits": peak <= target["memory_bytes"],
    "memory_fraction": peak / target["memory_bytes"],
    "temp_bytes": mem.temp_size_in_bytes,
    "argument_bytes": mem.argument_size_in_bytes,
    "alias_bytes": mem.alias_size_in_bytes,
    "flops": flops,
    "bytes_accessed": nbytes,
    "bound_compute_ms": 1e3 * flops / peak_flops if peak_flops else None,
    "memory_traffic_ms": 1e3 * nbytes / target["memory_bandwidth"],
    # A lower bound on the step: FLOPs at the matrix units' peak, and for a TPU (whose bytes are
    # the compiled, fused program's) the bytes at HBM bandwidth; a GPU's bytes come from the
    # unfused module, an overestimate of its traffic, so they bound nothing.
    "roofline_bound_ms": (
      1e3 * max(flops / peak_flops, nbytes / target["memory_bandwidth"] if tpu else 0.0)
      if peak_flops
      else None
    ),
    "collective_bytes": coll_bytes,
    "collective_ops": sum(c["count"] for c in census["collectives"].values()),
    "bound_collectives_ms": 1e3 * coll_bytes / ici if ici else None,
    **census,
  }


def largest_batch(config, mesh, members: int, strategy: str, target: dict, start: int) -> int:
  """The largest global batch (a multiple of the device count) whose step fits the device's
  memory, found by compiling: doubling from ``start``, then bisection."""
  d = mesh.devices.size

  def fits(b):
    config.batch_size = b
    return compile_variant(config, mesh, members, strategy, target)["fits"]

  lo, hi = 0, start
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > d:
    mid = (lo + hi) // 2 // d * d
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def main(argv=None):
  args = parse_args(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"  # no CUDA/TPU client is created: only a compile target
  # libtpu locks /tmp/libtpu_lockfile for the chips of a TPU VM; compiling here uses none, so
  # several compiles (another aot.py, the tests) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  common.set_host_device_count(args.devices)  # the CPU twin of a GPU mesh, for the cost analysis
  import jax  # noqa: F401

  text, target = read_target(args.target)
  rows = []
  for group in args.bn_group:
    mesh = target_mesh(text, args.devices, group)
    for model in args.models:
      for members in args.population:
        base = None
        for method in args.methods:
          kind = "eval" if method == "eval" else "train"
          c = config_for(
            model, "ce" if kind == "eval" else method, args.dtype, args.image_size, args.batch
          )
          c.model.bn_group = group
          c.eval_batch_size = 2 * args.batch  # the `accel` variant's ratio
          r = compile_variant(
            c, mesh, 1 if kind == "eval" else members, args.strategy, target, kind
          )
          batch = int(c.eval_batch_size or c.batch_size) if kind == "eval" else args.batch
          r.update(model=model, method=method, dtype=args.dtype, batch=batch)
          r.update(members=1 if kind == "eval" else members, bn_group=group or mesh.devices.size)
          if method == "ce":
            base = r
          if base is not None:
            r["flops_over_ce"] = r["flops"] / base["flops"]
            r["memory_over_ce"] = r["peak_bytes"] / base["peak_bytes"]
          if args.fit and method in ("ce", args.methods[-1]) and kind == "train":
            r["largest_batch"] = largest_batch(c, mesh, members, args.strategy, target, args.batch)
          convs = {k: v for k, v in r["kinds"].items() if "conv" in k}
          print(
            f"{model} {method} x{r['members']} b{batch} on {mesh.devices.size} device(s), BN "
            f"groups of {r['bn_group']}: {r['peak_gib']:.2f} GiB a device "
            f"({100 * r['memory_fraction']:.0f}% of {target['name']}'s), "
            f"{r['flops'] / 1e9:.0f} GFLOP, bound {r['roofline_bound_ms']:.2f} ms; convolutions "
            f"{convs}; collectives {r['collectives'] or 'none'}; host ops "
            f"{r['host_ops'] or 'none'} (compiled in {r['compile_s']:.0f}s)",
            flush=True,
          )
          rows.append(r)
  columns = [
    ("model", "model"),
    ("method", "method"),
    ("members", "members"),
    ("bn_group", "BN group"),
    ("batch", "global batch"),
    ("peak_gib", "peak GiB"),
    ("memory_fraction", "of device"),
    ("largest_batch", "largest batch"),
    ("flops", "FLOPs"),
    ("flops_over_ce", "FLOPs / CE"),
    ("memory_over_ce", "memory / CE"),
    ("roofline_bound_ms", "roofline bound ms"),
    ("collective_ops", "collectives"),
    ("collective_bytes", "collective bytes"),
    ("bound_collectives_ms", "collective bound ms"),
  ]
  md = (
    f"Compiled for {target['name']} ({target['spec']}) on the CPU (no accelerator): "
    f"{args.dtype} compute, {args.image_size} px, {mesh.devices.size} device(s). FLOPs: XLA's "
    "cost analysis; the roofline and collective figures are lower bounds (FLOPs / peak; on a TPU "
    "also the compiled program's bytes / HBM bandwidth; collective bytes / interconnect "
    "bandwidth), not measurements.\n\n" + common.table(rows, columns) + "\n"
  )
  print(md)
  if args.md:
    with open(args.md, "w") as f:
      f.write(md)
  common.write_json(
    args.json,
    {
      "benchmark": "aot",
      "args": vars(args),
      "target": target,
      "machine": common.machine_info(),
      "rows": rows,
    },
  )
  return rows


if __name__ == "__main__":
  main()
