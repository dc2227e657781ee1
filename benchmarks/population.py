r"""Population training: images/s of N runs in one program vs the same N runs one after another.

    python benchmarks/population.py --json benchmarks/results/population_tiny.json
    # on a GPU: ResNet-18 and DenseNet-121 at batch 20 (the CYBORG recipe's batch)
    python benchmarks/population.py --model resnet18 --image_size 224 --batch 20 --members 1,4,16

For each population size N: the population step (`population_step.make_population_train_step`,
N members with different seeds and loss weights, one program) with each way of running the
members (``vmap``: batched; ``unroll``: one after another in the program; ``auto`` picks unroll
on CPU) against N single-run steps (`step.make_train_step`, one program dispatched N times with
each member's state), on the same uint8 batch, all with the `difference` loss. All variants are compiled first, then timed interleaved
(`common.interleaved`: every round runs every variant, in a shuffled order); figures are medians
over rounds: training images/s (N x batch per population step) and the speed-up of each
population over the sequential runs (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--batch", type=int, default=20)
  p.add_argument("--members", default="1,4,16")
  p.add_argument("--method", default="difference")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--platform", default="cpu", help="cpu | gpu | tpu")
  p.add_argument("--strategies", default="vmap,unroll")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  args.members = [int(m) for m in args.members.split(",") if m]
  args.strategies = [x for x in args.strategies.split(",") if x]
  return args


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", args.platform)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from divisive_jax import config_base, population_step, preprocess, sharding, state, step

  c = config_base.base()
  config_base.set_method(c, args.method)
  c.model.name, c.model.dtype = args.model, args.dtype
  c.model.width, c.model.stem = (
    common.default_width(args.model),
    "small" if args.model == "tiny" else "imagenet",
  )
  c.data.image_size, c.data.channels, c.batch_size = args.image_size, args.channels, args.batch
  c.optim.name, c.optim.schedule = "sgd", "constant"
  setup = state.build(c, 10, 1000)
  mesh, rep = setup.mesh, sharding.replicated(setup.mesh)
  inputs = preprocess.from_config(c.data)
  batch = common.synthetic_batch(args.batch, args.image_size, args.channels)
  batch["image"] = (batch["image"] * 255).astype(np.uint8)
  batch["saliency"] = (batch["saliency"] * 255).astype(np.uint8)
  batch = sharding.to_global(batch, mesh)
  single = step.make_train_step(setup.model, setup.loss_cfg, setup.tx, mesh, inputs)
  pop_steps = {
    x: population_step.make_population_train_step(
      setup.model, setup.loss_cfg, setup.tx, mesh, inputs, x
    )
    for x in args.strategies
  }

  def member(seed):
    s = state.create_state(setup, seed)
    w = {t: jnp.float32(0.5 * (1 + seed % 3)) for t in setup.loss_cfg.names}
    return s.replace(loss_weights=jax.device_put(w, rep))

  fns, runs = {}, {}
  for n in args.members:

    def stacked(n=n):
      return jax.device_put(
        jax.tree.map(lambda *x: jnp.stack(x), *[member(i) for i in range(n)]), rep
      )

    runs[n] = {
      "seq": [member(i) for i in range(n)],
      "active": jax.device_put(jnp.ones(n, bool), rep),
    }
    for x in args.strategies:
      runs[n][x] = stacked()

      def run_pop(n=n, x=x):
        runs[n][x], m = pop_steps[x](runs[n][x], batch, runs[n]["active"])
        return m["loss"]

      fns[f"{x}_{n}"] = run_pop

    def run_seq(n=n):
      out = None
      for i in range(n):
        runs[n]["seq"][i], out = single(runs[n]["seq"][i], batch)
      return out["loss"]

    fns[f"sequential_{n}"] = run_seq
  for fn in fns.values():  # compile everything before timing
    common.block(fn())
  times = common.interleaved(fns, rounds=args.rounds, inner=1, warmup=1)
  rows = []
  for n in args.members:
    ts = times[f"sequential_{n}"]
    row = {
      "members": n,
      "sequential_images_per_s": n * args.batch / common.median(ts),
      "sequential_ms": 1e3 * common.median(ts),
    }
    for x in args.strategies:
      tp = times[f"{x}_{n}"]
      row[f"{x}_images_per_s"] = n * args.batch / common.median(tp)
      row[f"{x}_speedup"] = common.median([b / a for a, b in zip(tp, ts)])
      row[f"{x}_step_ms"] = 1e3 * common.median(tp)
    rows.append(row)
  info = common.machine_info()
  print(
    f"machine: {info.get('Model name', '?')}, {info.get('nproc')} CPUs; jax "
    f"{info.get('jax')} on {info.get('backend')} ({info.get('device_kind')})"
  )
  cols = [("members", "members"), ("sequential_images_per_s", "one after another img/s")]
  for x in args.strategies:
    cols += [(f"{x}_images_per_s", f"population ({x}) img/s"), (f"{x}_speedup", f"{x} speed-up")]
  print(common.table(rows, cols))
  common.write_json(
    args.json,
    {
      "benchmark": "population",
      "args": vars(args),
      "machine": info,
      "rows": rows,
      "times_s": times,
    },
  )


if __name__ == "__main__":
  main()
