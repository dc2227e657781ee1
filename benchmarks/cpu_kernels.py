r"""The backbones' CPU formulations, each against the plain XLA convolution (and against the
backbones of an earlier commit), in the trainer's own train step.

    python benchmarks/cpu_kernels.py --models resnet50,densenet121 --image_size 224 --batch 8 \
        --rounds 6 --against 588dcdd --json benchmarks/results/cpu_kernels.json
    python benchmarks/cpu_kernels.py --layers --json benchmarks/results/cpu_kernels_layers.json
    python benchmarks/cpu_kernels.py --layers --layer_batch 32 --json ..._layers_b32.json

For each model: the same config and state (`bench_config`, `state.create_state`), the backbone as
the library builds it ("today") and once more for each field of ``--off`` set to False:
``dot_1x1`` (1x1 convolutions as dot products, `models.resnet.CpuConv`) and ``patch_grad`` (k x k
weight gradients as one matrix product over patches on CPU, `models.resnet.CpuConv`);
``--against REV`` adds the same backbone built from ``divisive_jax/models/{resnet,densenet}.py``
of git revision ``REV`` (read with ``git show``, the rest of the package today's), so that each
change is timed against the code before it. All run through `loop.Dispatcher` (the step the
trainer runs, uint8 batches, the ``--method`` loss), compiled first, then timed interleaved
round-robin (`common.interleaved`, shuffled order). Reported: median ms per step of each, each
variant's speed-up of today's as the median of per-round ratios (variant / today), XLA's FLOPs and
the convolution and dot counts of each compiled program, and the machine (CPU model). (Until
2026-12-05 this was ``conv1x1.py``, with the one variant ``dot_1x1``.)

``--layers``: one k x k convolution's weight gradient alone, XLA's convolution vs
`models.resnet.conv_patch_grad`'s matrix product over patches, jitted, interleaved, for the layer
shapes of ResNet-18/50, DenseNet-121 and the tiny model (the evidence for
`models.resnet.patch_grad_from`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet50,densenet121")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--method", default="difference")
  p.add_argument("--width", type=int, default=0, help="0: the model's own (64)")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--off", default="dot_1x1,patch_grad", help="backbone fields to turn off, each")
  p.add_argument("--against", default="", help="a git revision whose backbones to time as well")
  p.add_argument("--layers", action="store_true", help="time single layers' weight gradients")
  p.add_argument("--layer_batch", type=int, default=0, help="--layers: the 224 px rows' batch")
  p.add_argument("--json", default="")
  return p.parse_args(argv)


def backbone_at(rev: str, backbone):
  """``backbone`` (a ResNet or DenseNet of today) built by revision ``rev``'s class of that name,
  with the fields both revisions know."""
  resnet = common.module_at(rev, "divisive_jax/models/resnet.py")
  sibling = [("from divisive_jax.models.resnet import", f"from {resnet.__name__} import")]
  densenet = common.module_at(rev, "divisive_jax/models/densenet.py", sibling)
  name = type(backbone).__name__
  cls = getattr(resnet, name, None) or getattr(densenet, name)
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  return cls(**{k: getattr(backbone, k) for k in known if hasattr(backbone, k)})


# (batch, input size, C_in, C_out, kernel, stride): ResNet-50's stem and 3x3s of each stage
# (ResNet-18's are among them), DenseNet-121's 3x3s (C_in 128, 32 out), the tiny model's at 64 px.
LAYERS = [
  (8, 224, 3, 64, 7, 2),
  (8, 56, 64, 64, 3, 1),
  (8, 56, 128, 128, 3, 2),
  (8, 28, 128, 128, 3, 1),
  (8, 28, 256, 256, 3, 2),
  (8, 14, 256, 256, 3, 1),
  (8, 14, 512, 512, 3, 2),
  (8, 7, 512, 512, 3, 1),
  (8, 56, 128, 32, 3, 1),
  (8, 28, 128, 32, 3, 1),
  (8, 14, 128, 32, 3, 1),
  (32, 64, 3, 16, 3, 1),
  (32, 64, 16, 16, 3, 1),
  (32, 32, 32, 32, 3, 1),
  (32, 16, 64, 64, 3, 1),
]


def time_layers(rounds: int, batch: int = 0) -> list[dict]:
  """Each shape of `LAYERS`: the weight gradient by XLA's convolution and by patches^T @ g;
  ``batch``: the batch of the 224 px backbones' rows (8 in `LAYERS`)."""
  import jax
  import numpy as np

  from divisive_jax.models import resnet

  rows = []
  for n, h, c, d, k, s in LAYERS:
    n = batch if batch and n == 8 else n
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.random((n, h, h, c), np.float32))
    w = jax.numpy.asarray(rng.standard_normal((k, k, c, d), np.float32))
    g = jax.numpy.ones(resnet._conv(x, w, s, k // 2).shape)
    fns = {}
    for name, f in (("convolution", resnet._conv), ("patches", resnet._conv_patch_grad)):
      grad = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w, s, k // 2), w)[1](g)[0])
      fns[name] = lambda grad=grad: grad(x, w, g)
    times = common.interleaved(fns, rounds=rounds, warmup=1)
    row = {"batch": n, "size": h, "c_in": c, "c_out": d, "kernel": k, "stride": s}
    row.update({f"{v}_ms": 1e3 * common.median(t) for v, t in times.items()})
    row["speedup"] = common.ratios(times, "patches")["convolution"]
    row["patch_grad_pays"] = resnet.patch_grad_pays(k, d, n * h * h * c)
    rows.append(row)
    print(
      f"{n}x{h}x{h}x{c} -> {d}, {k}x{k} stride {s}: convolution {row['convolution_ms']:.2f} ms, "
      f"patches {row['patches_ms']:.2f} ms ({row['speedup']:.2f}x); used: {row['patch_grad_pays']}",
      flush=True,
    )
  return rows


def main(argv=None):
  args = parse_args(argv)
  if args.layers:
    rows = time_layers(max(args.rounds, 7), args.layer_batch)
    out = {"benchmark": "cpu_kernels_layers", "machine": common.machine_info(), "rows": rows}
    common.write_json(args.json or None, out)
    return
  import jax

  from divisive_jax import sharding

  rows = []
  for name in args.models.split(","):
    config = common.bench_config(
      name, args.image_size, args.batch, variant=args.method, width=args.width
    )
    setup = common.train_setup(config)
    state0 = common.create_state(setup)
    batch = sharding.to_global(common.uint8_batch(args.batch, args.image_size), setup.mesh)
    fns, stats = {}, {}
    variants = [("today", {})] + [(f"{f}=False", {f: False}) for f in args.off.split(",") if f]
    variants += [(args.against, None)] * bool(args.against)
    for variant, fields in variants:
      if fields is None:
        backbone = backbone_at(args.against, setup.model.backbone)
      else:
        backbone = setup.model.backbone.clone(**fields)
      s = dataclasses.replace(setup, model=setup.model.clone(backbone=backbone))
      run, compiled, compile_s = common.dispatch_runner(
        s, common.state_for(state0, s), common.Repeat(batch)
      )
      stats[variant] = dict(common.compiled_stats(compiled), compile_s=compile_s)
      fns[variant] = lambda run=run: run()["loss"]
    for fn in fns.values():
      common.block(fn())
    times = common.interleaved(fns, rounds=args.rounds, warmup=1)
    speedups = common.ratios(times, "today")
    row = {
      "model": name,
      "image_size": args.image_size,
      "batch": args.batch,
      "method": args.method,
      "ms": {v: 1e3 * common.median(t) for v, t in times.items()},
      "speedup_of_today": {v: r for v, r in speedups.items() if v != "today"},
      "against": args.against or None,
      "compiled": stats,
    }
    rows.append(row)
    print(
      f"{name} at {args.image_size} px, batch {args.batch}, {args.method}: today "
      f"{row['ms']['today']:.0f} ms a step; "
      + "; ".join(
        f"{v} {row['ms'][v]:.0f} ms (today's {r:.2f}x as fast)"
        for v, r in row["speedup_of_today"].items()
      )
      + f" (medians of {args.rounds} rounds)"
    )
  out = {"benchmark": "cpu_kernels", "machine": common.machine_info(), "rows": rows}
  common.write_json(args.json or None, out)
  del jax


if __name__ == "__main__":
  main()
