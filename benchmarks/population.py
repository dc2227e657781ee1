r"""Population training: images/s of N runs in one program vs the same N runs one after another.

    python benchmarks/population.py --json benchmarks/results/population_tiny.json
    # one member against the single-run step of an earlier commit (the one-training-path check)
    python benchmarks/population.py --members 1 --against 222a642 --rounds 15
    # on a GPU: ResNet-18 at batch 20 (the CYBORG recipe's batch)
    python benchmarks/population.py --model resnet18 --image_size 224 --batch 20 --members 1,4,16

Everything runs through the trainer's own dispatch (`loop.Dispatcher` via
`common.dispatch_runner`) on one uint8 batch already on the device, with the `difference`
loss. For each population size N: the population step of N members (different seeds and loss
weights, one program; ``--strategies``: ``vmap`` batched, ``unroll`` one after another in the
program) against N one-member dispatches one after another (the program of a single run,
dispatched N times with each member's state). A population of one IS the single-run program, so
N = 1 has no strategies; ``--against REV`` adds the single-run step of commit REV (its
``divisive_jax/step.py``, read with git, dispatched as that commit's trainer did:
``state, metrics = train_step(state, next(batches))``), so that a one-member population can be
compared with the old single run in one process: ``one_member_over_against`` is the median of
per-round images/s ratios, with both programs' FLOPs and convolution counts.

All variants are compiled first, then timed interleaved (`common.interleaved`: every round runs
every variant, in a shuffled order); figures are medians over rounds: training images/s (N x
batch per population step) and the speed-up of each population over the sequential runs
(median of per-round ratios).
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
  p.add_argument("--against", default="", help="a git revision whose single-run step to time")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  args.members = [int(m) for m in args.members.split(",") if m]
  args.strategies = [x for x in args.strategies.split(",") if x]
  return args


def main(argv=None):
  args = parse_args(argv)
  common.use_platform(args.platform, 1)
  import jax
  import jax.numpy as jnp

  from divisive_jax import config_base, preprocess, sharding, state
  from divisive_jax import step as step_lib

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
  batch = sharding.to_global(common.uint8_batch(args.batch, args.image_size, args.channels), mesh)
  feed = common.Repeat(batch)

  def member(seed):
    s = state.create_state(setup, seed)
    w = {t: jnp.float32(0.5 * (1 + seed % 3)) for t in setup.loss_cfg.names}
    return s.replace(loss_weights=jax.device_put(w, rep))

  fns, stats = {}, {}
  for n in args.members:
    seq_states = [member(i) for i in range(n)]
    one, compiled, _ = common.dispatch_runner(setup, seq_states[0], feed)
    stats[f"sequential_{n}"] = common.compiled_stats(compiled)

    def run_seq(one=one, states=seq_states):
      out = None
      for i in range(len(states)):  # N runs one after another: N dispatches of one member
        one.box["state"] = states[i]
        out = one()
        states[i] = one.box["state"]
      return out["loss"]

    fns[f"sequential_{n}"] = run_seq
    for x in args.strategies if n > 1 else ():
      pop = step_lib.join_members([member(i) for i in range(n)], rep)
      run, compiled, _ = common.dispatch_runner(setup, pop, feed, members=n, strategy=x)
      stats[f"{x}_{n}"] = common.compiled_stats(compiled)
      fns[f"{x}_{n}"] = lambda run=run: run()["loss"]
  if args.against:
    old = common.module_at(args.against, "divisive_jax/step.py")
    inputs = preprocess.from_config(c.data)
    old_step = old.make_train_step(setup.model, setup.loss_cfg, setup.tx, mesh, inputs)
    box = {"state": member(0)}
    compiled = old_step.lower(box["state"], batch).compile()
    stats["against"] = common.compiled_stats(compiled)

    def run_old():
      box["state"], metrics = compiled(box["state"], next(feed))  # that commit's dispatch
      return metrics["loss"]

    fns["against"] = run_old
  for fn in fns.values():  # everything compiled and run once before timing
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
    for x in args.strategies if n > 1 else ():
      tp = times[f"{x}_{n}"]
      row[f"{x}_images_per_s"] = n * args.batch / common.median(tp)
      row[f"{x}_speedup"] = common.median([b / a for a, b in zip(tp, ts)])
      row[f"{x}_step_ms"] = 1e3 * common.median(tp)
    rows.append(row)
  against = None
  if args.against and 1 in args.members:
    new, old = times["sequential_1"], times["against"]
    against = {
      "revision": args.against,
      "images_per_s": args.batch / common.median(old),
      "one_member_images_per_s": args.batch / common.median(new),
      "one_member_over_against": common.median([o / w for w, o in zip(new, old)]),
      "flops": [stats["sequential_1"].get("flops"), stats["against"].get("flops")],
      "convolutions": [
        stats[k].get("hlo_ops", {}).get("convolution") for k in ("sequential_1", "against")
      ],
    }
  info = common.machine_info()
  print(
    f"machine: {info.get('Model name', '?')}, {info.get('nproc')} CPUs; jax "
    f"{info.get('jax')} on {info.get('backend')} ({info.get('device_kind')})"
  )
  cols = [("members", "members"), ("sequential_images_per_s", "one after another img/s")]
  for x in args.strategies:
    cols += [(f"{x}_images_per_s", f"population ({x}) img/s"), (f"{x}_speedup", f"{x} speed-up")]
  print(common.table(rows, cols))
  if against:
    print(
      f"one member / the single run of {args.against}: "
      f"{against['one_member_over_against']:.3f} (images/s, median of per-round ratios); "
      f"FLOPs {against['flops'][0]:.4g} vs {against['flops'][1]:.4g}, convolutions "
      f"{against['convolutions'][0]} vs {against['convolutions'][1]}"
    )
  common.write_json(
    args.json,
    {
      "benchmark": "population",
      "args": vars(args),
      "machine": info,
      "rows": rows,
      "against": against,
      "compiled": {k: {kk: v.get(kk) for kk in ("flops", "hlo_ops")} for k, v in stats.items()},
      "times_s": times,
    },
  )


if __name__ == "__main__":
  main()
