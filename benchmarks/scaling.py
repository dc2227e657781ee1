r"""Train-step throughput over 1, 2, 4, 8 devices at fixed per-device and at fixed global batch.

    python benchmarks/scaling.py --json /tmp/bench/scaling.json
    python benchmarks/scaling.py --model resnet18 --image_size 64 --per_device_batch 4 \
        --global_batch 32 --steps 6

On CPU the devices are SIMULATED: the script sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` itself (before importing jax) unless XLA_FLAGS
already sets a count. All simulated devices share the same cores, so the figures measure the
code path and the collective (psum / synchronised BatchNorm) overhead of the sharded step, NOT
a real speed-up; on a machine with real accelerators the same script measures real scaling.

For each loss (`ce`, `difference` by default), each device count n and each batch mode
(`per_device`: global batch = n * per_device_batch; `global`: global batch fixed), the train step
is built as the trainer builds it (a `config_base.base()` config with the method set by
`config_base.set_method`, `state.build` on a ('data',) mesh of the first n devices with BatchNorm
synchronised over 'data', `state.create_state`, `step.make_train_step`; uint8 batches as the data
layer delivers them, preprocessed on the device); all configurations are compiled first, then
timed round-robin in one run. Reported: median step time, steps/s, images/s and, relative to the same
loss and batch mode on 1 device, the median per-round ratio of images/s.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LABEL = "simulated CPU devices: measures the code path/collective overhead, not real speedup"


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="tiny")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--stem", default="small", choices=("imagenet", "small"))
  p.add_argument("--width", type=int, default=0)
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--per_device_batch", type=int, default=8)
  p.add_argument(
    "--global_batch",
    type=int,
    default=32,
    help="fixed global batch (divisible by every device count)",
  )
  p.add_argument("--modes", default="per_device,global")
  p.add_argument("--losses", default="ce,difference", help="methods of losses.METHODS")
  p.add_argument(
    "--platform",
    default="cpu",
    help="cpu (simulated devices), gpu, tpu, or '' for JAX's default backend",
  )
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--inner", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--json", default="")
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)
  args.devices = [int(d) for d in args.devices.split(",") if d]
  args.modes = [m for m in args.modes.split(",") if m]
  args.losses = [m for m in args.losses.split(",") if m]
  bad = [d for d in args.devices if args.global_batch % d]
  if "global" in args.modes and bad:
    p.error(f"--global_batch {args.global_batch} is not divisible by device counts {bad}")
  args.rounds = max(1, args.steps // args.inner)
  return args


def main(argv=None):
  args = parse_args(argv)
  common.use_platform(args.platform, max(args.devices))
  import jax
  from divisive_jax import sharding

  if jax.device_count() < max(args.devices):
    raise SystemExit(
      f"need {max(args.devices)} devices, have {jax.device_count()} (XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS', '')!r})"
    )
  info = common.machine_info()
  platform = jax.devices()[0].platform
  label = LABEL if platform == "cpu" else f"{platform} devices"
  print(
    f"machine: {info.get('Model name', '?')}, {info['nproc']} CPUs; {jax.device_count()} "
    f"{platform} devices; {label}"
  )

  runners, meta = {}, {}
  for mode in args.modes:
    for n in args.devices:
      gb = n * args.per_device_batch if mode == "per_device" else args.global_batch
      host = common.uint8_batch(gb, args.image_size, 3)
      batch, state0 = None, None
      for loss in args.losses:
        config = common.bench_config(
          args.model,
          args.image_size,
          gb,
          variant=loss,
          width=args.width,
          stem=args.stem,
        )
        setup = common.train_setup(config, jax.devices()[:n])
        if state0 is None:
          batch = sharding.to_global(host, setup.mesh)
          state0 = common.create_state(setup)
        state = common.state_for(state0, setup)
        run, _, compile_s = common.dispatch_runner(setup, state, common.Repeat(batch))
        common.block(run())
        key = f"{loss}/{mode}/{n}"
        runners[key] = run
        meta[key] = {
          "loss": loss,
          "mode": mode,
          "devices": n,
          "global_batch": gb,
          "per_device_batch": gb // n,
          "compile_s": compile_s,
        }
        print(f"compiled {key} (global batch {gb}) in {compile_s:.1f}s", flush=True)

  times = common.interleaved(
    runners,
    rounds=args.rounds,
    inner=args.inner,
    warmup=args.warmup,
    log=None if args.quiet else print,
  )
  rows = []
  for key, m in meta.items():
    ts = times[key]
    med = common.median(ts)
    ref = f"{m['loss']}/{m['mode']}/{args.devices[0]}"
    ref_gb = meta[ref]["global_batch"]
    # images/s relative to the reference: (gb / t) / (ref_gb / t_ref), per round.
    rel = common.median([(m["global_batch"] / a) / (ref_gb / b) for a, b in zip(ts, times[ref])])
    rows.append(
      {
        **m,
        "step_ms": med * 1e3,
        "steps_per_s": 1.0 / med,
        "images_per_s": m["global_batch"] / med,
        "images_per_s_vs_1_device": rel,
        "step_ms_per_round": [t * 1e3 for t in ts],
      }
    )
  print()
  print(f"{args.model} {args.image_size} px; {label}; {args.rounds} rounds x {args.inner} steps")
  print(
    common.table(
      rows,
      [
        ("loss", "loss"),
        ("mode", "batch mode"),
        ("devices", "devices"),
        ("global_batch", "global batch"),
        ("step_ms", "step ms (median)"),
        ("steps_per_s", "steps/s"),
        ("images_per_s", "images/s"),
        ("images_per_s_vs_1_device", f"images/s vs {args.devices[0]} device (median)"),
      ],
    )
  )
  common.write_json(
    args.json,
    {"benchmark": "scaling", "label": label, "args": vars(args), "machine": info, "rows": rows},
  )
  return rows


if __name__ == "__main__":
  main()
