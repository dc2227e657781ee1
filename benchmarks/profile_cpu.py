r"""Where a CPU train step spends its time, by op kind, in JAX and in PyTorch (issue 30).

    python benchmarks/profile_cpu.py --model resnet50 --batch 8 --image_size 224 --steps 3 \
        --json benchmarks/results/profile_cpu_resnet50.json
    /tmp/torchvenv/bin/python benchmarks/profile_cpu.py ...   # adds PyTorch's side

JAX: the trainer's step (`common.dispatch_runner`, the ``--method`` loss, uint8 batches) is
traced with `jax.profiler` for ``--steps`` steps after a warm-up; XLA's CPU runtime records one
event per executed HLO instruction (thunk), and each is classed from the optimised HLO
(`compiled.as_text()`): convolutions and dot products by window (1x1, 3x3, 7x7) and direction
(forward; backward input gradient; backward weight gradient, from the name stack's
``transpose(jvp(...))`` and the output's shape), the rest by the Flax module or library in the
name stack (BatchNorm, the optimiser, the CAM and saliency loss, pooling) or as other
elementwise / copy work. PyTorch (where torch and torchvision import): the same model as
`torch_compare.py` builds it (torchvision, NCHW, SGD with momentum, the CAM loss the same way)
under `torch.profiler`, its CPU ops classed by name (``aten::convolution_backward`` is split
into input and weight gradient only by the profiler's own sub-ops, else reported whole). Each
side reports milliseconds per step per class and the share of the step; both step times
(median of the untraced ``--rounds``, interleaved) put the profiles in proportion.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="resnet50")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--method", default="difference", help="ours; PyTorch: ce or the CAM loss")
  p.add_argument("--width", type=int, default=0)
  p.add_argument("--steps", type=int, default=3, help="traced steps")
  p.add_argument("--rounds", type=int, default=3, help="untimed-trace rounds for step times")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS (set before jax starts)")
  p.add_argument("--json", default="")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------- HLO
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([a-z][a-z0-9\-]*)\(")
_WINDOW = re.compile(r"window=\{size=(\d+)x(\d+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_instructions(text: str) -> dict[str, dict]:
  """{instruction name: {opcode, shape, window, op_name, calls}} of an optimised module."""
  out, computation = {}, None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      entry = line.startswith("ENTRY")
      computation = (line.split()[1] if entry else line.split()[0]).lstrip("%")
      if entry:
        out["__entry__"] = dict(computation=computation)
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    window = _WINDOW.search(line)
    opname = _OPNAME.search(line)
    calls = _CALLS.search(line)
    out[name] = dict(
      opcode=opcode,
      shape=shape,
      window=f"{window.group(1)}x{window.group(2)}" if window else "",
      op_name=opname.group(1) if opname else "",
      calls=calls.group(1) if calls else "",
      computation=computation,
    )
  return out


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def classify(name: str, instrs: dict, batch: int, kernels=frozenset()) -> str:
  """The op kind of HLO instruction ``name`` (module docstring); ``batch``: a device's;
  ``kernels``: the (C_in, C_out) of the model's 1x1 kernels (a dot's weight gradient has that
  shape; its input gradient is [rows, C])."""
  ins = instrs.get(name)
  if ins is None:
    return "other"
  heavy = ins
  if ins["opcode"] == "fusion":  # a fusion is what it fuses: a convolution or dot if any
    body = [i for i in instrs.values() if i["computation"] == ins["calls"]]
    heavy = next((i for i in body if i["opcode"] in ("convolution", "dot")), ins)
  op, path = heavy["opcode"], heavy["op_name"] or ins["op_name"]
  if op in ("convolution", "dot"):
    dims = _dims(heavy["shape"])
    what = "conv" if op == "convolution" else "1x1 dot"
    size = heavy["window"] if op == "convolution" else ""
    if path and "transpose(" not in path:
      grad = "forward"
    elif op == "dot":
      grad = "weight grad" if tuple(dims) in kernels else "input grad"
    elif dims and dims[0] == batch:
      grad = "input grad"
    else:  # a weight gradient, [C_in, kh, kw, C_out]: its window is the activation's size
      grad = "weight grad"
      size = f"{dims[1]}x{dims[2]}" if op == "convolution" and len(dims) == 4 else size
    return " ".join(filter(None, (what, size, grad)))
  if "patches" in path.split("/"):  # `models.resnet.patches`: a patch-gradient layer's input
    return "patches (patch-gradient layers)"
  if op in ("copy", "transpose") or "copy" in name or "transpose" in name:
    return "copies and transposes"  # layout changes, whatever op they feed
  if any(re.fullmatch(r"bn\d|norm\d?|downsample_1", part) for part in path.split("/")):
    return "BatchNorm"
  if op in ("reduce-window", "select-and-scatter") or "reduce-window" in name:
    return "pooling"
  if "Classifier" in path:
    return "other model ops (ReLU, residual adds)"
  if "jvp(" in path:
    return "CAM and losses"
  return "optimiser and the rest" if path else "unnamed (XLA's own)"


def jax_profile(args) -> dict:
  import jax

  from divisive_jax import sharding

  config = common.bench_config(
    args.model, args.image_size, args.batch, variant=args.method, width=args.width
  )
  setup = common.train_setup(config)
  state = common.create_state(setup)
  leaves = jax.tree.leaves(state.params)  # shapes only (the step donates the state)
  kernels = {tuple(p.shape[2:]) for p in leaves if p.ndim == 4 and p.shape[:2] == (1, 1)}
  batch = sharding.to_global(common.uint8_batch(args.batch, args.image_size), setup.mesh)
  run, compiled, _ = common.dispatch_runner(setup, state, common.Repeat(batch))
  instrs = hlo_instructions(compiled.as_text())
  times = common.interleaved({"ours": lambda: run()["loss"]}, rounds=args.rounds, warmup=1)
  folder = tempfile.mkdtemp(prefix="jax_trace_")
  with jax.profiler.trace(folder):
    for _ in range(args.steps):
      common.block(run()["loss"])
  path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        if e.name in instrs and instrs[e.name]["computation"] == _entry(instrs):
          per_op[e.name] += e.duration_ns
  kinds, local = collections.Counter(), args.batch // setup.mesh.size  # one device's rows
  kernels = {
    tuple(p.shape[2:])
    for p in jax.tree.leaves(state.params)
    if p.ndim == 4 and p.shape[:2] == (1, 1)
  }
  for name, ns in per_op.items():
    kinds[classify(name, instrs, local, kernels)] += ns / 1e6 / args.steps
  top = [
    dict(op=n, ms=ns / 1e6 / args.steps, kind=classify(n, instrs, local, kernels),
         shape=instrs[n]["shape"], op_name=instrs[n]["op_name"])
    for n, ns in per_op.most_common(25)
  ]  # fmt: skip
  return dict(step_ms=1e3 * common.median(times["ours"]), by_kind=dict(kinds), top_ops=top)


def _entry(instrs: dict) -> str:
  return instrs["__entry__"]["computation"]


# ----------------------------------------------------------------------------------- torch
# (name prefix, kind), first match wins; names without "aten::".
_TORCH_KINDS = (
  ("convolution_backward", "conv backward (input + weight grad)"),
  ("mkldnn_convolution", "conv forward"),
  ("convolution", "conv forward"),
  ("native_batch_norm", "BatchNorm"),
  ("batch_norm", "BatchNorm"),
  ("max_pool", "pooling"),
  ("avg_pool", "pooling"),
  ("adaptive_avg_pool", "pooling"),
  ("mean", "pooling"),
  ("addmm", "linear head"),
  ("mm", "linear head"),
  ("add_", "optimiser and the rest"),
  ("mul_", "optimiser and the rest"),
  ("_foreach", "optimiser and the rest"),
  ("Optimizer", "optimiser and the rest"),
  ("fill_", "optimiser and the rest"),
  ("zero_", "optimiser and the rest"),
  ("relu", "other model ops (ReLU, residual adds)"),
  ("threshold_backward", "other model ops (ReLU, residual adds)"),
  ("add", "other model ops (ReLU, residual adds)"),
  ("copy_", "CAM, losses and input"),
  ("_to_copy", "CAM, losses and input"),
  ("div", "CAM, losses and input"),
  ("sub", "CAM, losses and input"),
  ("mul", "CAM, losses and input"),
  ("amin", "CAM, losses and input"),
  ("amax", "CAM, losses and input"),
  ("where", "CAM, losses and input"),
  ("mse", "CAM, losses and input"),
  ("upsample", "CAM, losses and input"),
  ("_upsample", "CAM, losses and input"),
  ("cross_entropy", "CAM, losses and input"),
  ("nll", "CAM, losses and input"),
  ("_log_softmax", "CAM, losses and input"),
)


def torch_profile(args, host) -> dict | None:
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  except ImportError as e:
    print(f"PyTorch side skipped: {e}")
    return None
  import torch
  from torch.profiler import ProfilerActivity, profile

  import torch_compare

  torch.set_num_threads(os.cpu_count())
  variant = "ce" if args.method == "ce" else "cam"
  step, _ = torch_compare.torch_runner(args.model, variant, host)
  times = common.interleaved({"torch": step}, rounds=args.rounds, warmup=1)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      step()
  kinds, top = collections.Counter(), []
  events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  for e in events:
    # self CPU time: each op's own work, so nested ops are not counted twice
    name = e.key.replace("aten::", "")
    kind = next((k for key, k in _TORCH_KINDS if name.startswith(key)), "other")
    ms = e.self_cpu_time_total / 1e3 / args.steps
    kinds[kind] += ms
    if len(top) < 25:
      top.append(dict(op=e.key, ms=ms, kind=kind, calls=e.count // args.steps))
  return dict(step_ms=1e3 * common.median(times["torch"]), by_kind=dict(kinds), top_ops=top)


def main(argv=None):
  args = parse_args(argv)
  common.add_xla_flags(args.xla_flags)
  host = common.uint8_batch(args.batch, args.image_size)
  out = {
    "benchmark": "profile_cpu",
    "machine": common.machine_info(),
    "args": vars(args),
    "jax": jax_profile(args),
  }
  if not args.no_torch:
    out["torch"] = torch_profile(args, host)
  for side in ("jax", "torch"):
    prof = out.get(side)
    if not prof:
      continue
    total = sum(prof["by_kind"].values())
    print(f"\n{side}: step {prof['step_ms']:.0f} ms (median, untraced); traced ops {total:.0f} ms")
    print("| op kind | ms a step | share |\n|---|---|---|")
    for kind, ms in sorted(prof["by_kind"].items(), key=lambda kv: -kv[1]):
      print(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |")
  common.write_json(args.json or None, out)


if __name__ == "__main__":
  main()
