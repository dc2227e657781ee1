r"""1x1 convolutions as dot products vs as convolutions, in the trainer's own train step.

    python benchmarks/conv1x1.py --models resnet50,densenet121 --image_size 224 --batch 8 \
        --rounds 6 --json benchmarks/results/conv1x1_cpu.json

For each model: the same config and state (`bench_config`, `state.create_state`), the backbone
once with ``dot_1x1=True`` (the library's: `models.resnet.Conv1x1`) and once with ``False``
(`nn.Conv`, what the models used before), both through `loop.Dispatcher` (the step the trainer
runs, uint8 batches, the ``--method`` loss), compiled first, then timed interleaved round-robin
(`common.interleaved`, shuffled order). Reported: median ms per step of each, the speed-up as
the median of per-round ratios (conv / dot), XLA's FLOPs and the convolution and dot counts of
each compiled program, and the machine (CPU model).
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
  p.add_argument("--json", default="")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
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
    for variant, dot in (("dot", True), ("conv", False)):
      backbone = setup.model.backbone.clone(dot_1x1=dot)
      s = dataclasses.replace(setup, model=setup.model.clone(backbone=backbone))
      run, compiled, compile_s = common.dispatch_runner(
        s, common.state_for(state0, s), common.Repeat(batch)
      )
      stats[variant] = dict(common.compiled_stats(compiled), compile_s=compile_s)
      fns[variant] = lambda run=run: run()["loss"]
    for fn in fns.values():
      common.block(fn())
    times = common.interleaved(fns, rounds=args.rounds, warmup=1)
    speedup = common.ratios(times, "dot")["conv"]
    row = {
      "model": name,
      "image_size": args.image_size,
      "batch": args.batch,
      "method": args.method,
      "dot_ms": 1e3 * common.median(times["dot"]),
      "conv_ms": 1e3 * common.median(times["conv"]),
      "speedup": speedup,
      "compiled": stats,
    }
    rows.append(row)
    print(
      f"{name} at {args.image_size} px, batch {args.batch}, {args.method}: 1x1 as dot "
      f"{row['dot_ms']:.0f} ms, as convolution {row['conv_ms']:.0f} ms a step: "
      f"{speedup:.2f}x (median of {args.rounds} per-round ratios)"
    )
  out = {"benchmark": "conv1x1", "machine": common.machine_info(), "rows": rows}
  common.write_json(args.json or None, out)
  del jax


if __name__ == "__main__":
  main()
