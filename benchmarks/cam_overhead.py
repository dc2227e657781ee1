r"""Cost of the saliency losses relative to plain cross-entropy, per training step.

    python benchmarks/cam_overhead.py --models resnet50 --image_size 224 --batch 8 \
        --steps 10 --json /tmp/bench/cam_overhead_resnet50.json
    python benchmarks/cam_overhead.py --models tiny --image_size 64 --batch 32 --steps 30 \
        --inner 3 --json /tmp/bench/cam_overhead_tiny.json

The train step is built exactly as the trainer builds it: a config from `config_base.base()`
with the variant's method set by `config_base.set_method` (so `masked` keeps `loss.mask_input`)
and, for `+gradcam`, `loss.cam_kind`; `state.build` (model with BatchNorm synchronised over
'data', the CYBORG SGD recipe, `losses.from_config`) on a ('data',) mesh of `--devices`
devices; `state.create_state` (once; each variant gets a copy with its own loss weights, as a
resumed run sets them); `step.make_train_step` with `preprocess.from_config`. Variants: CE
alone (and, with `--aa_control`, a second CE executable 'ce#2' as an A/A control) and each
method of `losses.METHODS`: cyborg, difference, opposition, margin (each with CAM and with
Grad-CAM), gradmask, rrr, actdiff, masked. Batches are what the data layer delivers: uint8
images and uint8 human maps (one Gaussian blob each, has_saliency=1), balanced labels, sharded
over the mesh; the step's device-side preprocessing (uint8 -> float) is part of what is timed.

Every variant is compiled first (`jit.lower(...).compile()`, timed: trace + compile), then all
variants are timed interleaved: each round runs each variant's step `--inner` times and blocks,
in an order shuffled every round; `--steps` timed steps per variant in total (rounds = steps /
inner). Reported: median seconds per step, the ratio to CE as the MEDIAN OF PER-ROUND RATIOS
(robust to a noisy shared machine), images/s, XLA's static FLOPs (cost analysis, ratio to
CE) and buffer sizes (memory analysis: temp = the step's scratch memory), HLO op counts,
and peak memory: the device's `memory_stats()['peak_bytes_in_use']` where the backend reports it
(GPU/TPU), else the growth of the process's max RSS (`getrusage`) while compiling and first
running the variant, labelled `rss_hwm_delta_mb` — a high-water mark, so a variant that needs no
more than an earlier one shows 0.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets sys.path to the repo; must precede jax for device flags)

CAM_METHODS = ("cyborg", "difference", "opposition", "margin")
ALL_VARIANTS = (
  ("ce",)
  + CAM_METHODS
  + tuple(f"{m}+gradcam" for m in CAM_METHODS)
  + ("gradmask", "rrr", "actdiff", "masked")
)
DUAL_CAM = ("difference", "opposition", "margin")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--models",
    default="resnet50",
    help="comma list of models.BACKBONES (resnet18, resnet50, densenet121, tiny, vit_s16, ...)",
  )
  p.add_argument("--batch", type=int, default=8, help="global batch size")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--stem", default="imagenet", choices=("imagenet", "small"))
  p.add_argument("--width", type=int, default=0, help="0: the model's default width")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument(
    "--devices",
    type=int,
    default=1,
    help="devices in the mesh (CPU: simulated with "
    "--xla_force_host_platform_device_count, set automatically)",
  )
  p.add_argument(
    "--platform",
    default="cpu",
    help="cpu (simulated devices), gpu, tpu, or '' for JAX's default backend",
  )
  p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  p.add_argument("--inner", type=int, default=1, help="steps per variant per round")
  p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
  p.add_argument(
    "--variants",
    default=",".join(ALL_VARIANTS),
    help=f"comma list from {','.join(ALL_VARIANTS)} (ce is always included)",
  )
  p.add_argument(
    "--aa_control",
    action="store_true",
    help="also time a second, separately compiled CE step ('ce#2'): an A/A control "
    "whose ratio to CE shows the noise floor and any position bias",
  )
  p.add_argument("--dump_hlo", default="", help="directory for each variant's optimized HLO")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--json", default="", help="write every figure to this JSON file")
  p.add_argument("--quiet", action="store_true", help="no per-round log lines")
  args = p.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  bad = sorted(set(variants) - set(ALL_VARIANTS))
  if bad:
    p.error(f"unknown variant(s) {bad}; valid: {', '.join(ALL_VARIANTS)}")
  args.variants = ["ce"] + [v for v in variants if v not in ("ce", "ce#2")]
  if args.aa_control:
    args.variants.insert(1, "ce#2")
  args.models = [m for m in args.models.split(",") if m]
  if args.batch % args.devices:
    p.error(f"--batch {args.batch} must be divisible by --devices {args.devices}")
  args.rounds = max(1, args.steps // args.inner)
  return args


def build_config(args, model_name: str, variant: str):
  """`config_base.base()` with the model, input and the variant's method (`set_method`)."""
  return common.bench_config(
    model_name,
    args.image_size,
    args.batch,
    variant=variant,
    dtype=args.dtype,
    width=args.width,
    stem=args.stem,
    channels=args.channels,
  )


def bench_model(args, model_name: str, log) -> list[dict]:
  import jax
  from divisive_jax import sharding

  devices = jax.devices()[: args.devices]
  host = common.uint8_batch(args.batch, args.image_size, args.channels)
  batch, state0 = None, None
  runners, rows = {}, {}
  for variant in args.variants:
    setup = common.train_setup(build_config(args, model_name, variant), devices)
    if state0 is None:  # one initialisation; each variant gets a copy with its loss weights
      batch = sharding.to_global(host, setup.mesh)
      state0 = common.create_state(setup)
    state = common.state_for(state0, setup)
    cfg = setup.loss_cfg
    rss0 = common.max_rss_mb()
    run, compiled, compile_s = common.dispatch_runner(setup, state, common.Repeat(batch))
    stats = common.compiled_stats(compiled)
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      with open(os.path.join(args.dump_hlo, f"{model_name}_{variant}.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    first = run()
    common.block(first)
    loss = float(first["loss"])
    rows[variant] = {
      "model": model_name,
      "variant": variant,
      "terms": "+".join(cfg.names),
      "cam_kind": cfg.cam_kind if "maps" in cfg.needs else "-",
      "mask_input": cfg.mask_input,
      "compile_s": compile_s,
      "first_loss": loss,
      "rss_hwm_delta_mb": common.max_rss_mb() - rss0,
      "device_peak_mb": common.device_peak_mb(),
      **stats,
    }
    runners[variant] = run
    log(
      f"[{model_name}] compiled {variant:20s} in {compile_s:6.1f}s  "
      f"GFLOP/step={stats.get('flops', float('nan')) / 1e9:.2f}  loss={loss:.4f}"
    )

  log(
    f"[{model_name}] timing {len(runners)} variants: {args.rounds} rounds x {args.inner} "
    f"step(s), interleaved"
  )
  times = common.interleaved(
    runners,
    rounds=args.rounds,
    inner=args.inner,
    warmup=args.warmup,
    log=None if args.quiet else log,
  )
  ratio = common.ratios(times, "ce")
  ce_flops = rows["ce"].get("flops")
  out = []
  for variant in args.variants:
    r = rows[variant]
    med = common.median(times[variant])
    lo, hi = common.ratio_iqr(times[variant], times["ce"])
    r.update(
      step_ms=med * 1e3,
      ratio_to_ce=ratio[variant],
      ratio_q25=lo,
      ratio_q75=hi,
      images_per_s=args.batch / med,
      step_ms_per_round=[t * 1e3 for t in times[variant]],
      flops_ratio_to_ce=(r["flops"] / ce_flops) if ce_flops and "flops" in r else None,
      convolutions=r.get("hlo_ops", {}).get("convolution"),
      batch=args.batch,
      image_size=args.image_size,
      dtype=args.dtype,
      devices=args.devices,
    )
    out.append(r)
  return out


COLUMNS = [
  ("model", "model"),
  ("variant", "variant"),
  ("compile_s", "compile s"),
  ("step_ms", "step ms (median)"),
  ("ratio_to_ce", "ratio to CE (median)"),
  ("ratio_q25", "q25"),
  ("ratio_q75", "q75"),
  ("images_per_s", "images/s"),
  ("flops_ratio_to_ce", "FLOPs ratio"),
  ("convolutions", "HLO convs"),
  ("temp_mb", "XLA temp MiB"),
  ("rss_hwm_delta_mb", "RSS hwm delta MiB"),
]


def main(argv=None):
  args = parse_args(argv)
  common.use_platform(args.platform, max(args.devices, 1))
  common.add_xla_flags(args.xla_flags)
  import jax

  if jax.device_count() < args.devices:
    raise SystemExit(f"--devices {args.devices} but only {jax.device_count()} available")
  log = print
  info = common.machine_info()
  log(
    f"machine: {info.get('Model name', '?')}, {info['nproc']} CPUs; jax {info.get('jax')} "
    f"on {info.get('backend')} ({info.get('devices')} devices); XLA_FLAGS={info['XLA_FLAGS']!r}"
  )
  rows = []
  for m in args.models:
    rows += bench_model(args, m, log)
  memory_label = (
    "device peak_bytes_in_use"
    if any(r["device_peak_mb"] is not None for r in rows)
    else "process max-RSS high-water delta (CPU backend has no memory_stats)"
  )
  print()
  print(
    f"batch {args.batch}, {args.image_size} px, {args.dtype}, {args.devices} device(s), "
    f"{args.rounds} rounds x {args.inner} step(s); memory: {memory_label}"
  )
  print(common.table(rows, COLUMNS))
  checks = []
  for m in args.models:
    for v in DUAL_CAM:
      r = next((r for r in rows if r["model"] == m and r["variant"] == v), None)
      if r is not None:
        checks.append(
          {
            "model": m,
            "variant": v,
            "ratio_to_ce": r["ratio_to_ce"],
            "floor": 1.05,
            "ok": r["ratio_to_ce"] <= 1.05,
          }
        )
  if checks:
    print()
    for c in checks:
      print(
        f"floor check {c['model']} {c['variant']}: ratio {c['ratio_to_ce']:.3f} "
        f"{'<=' if c['ok'] else '>'} 1.05 -> {'OK' if c['ok'] else 'ABOVE FLOOR'}"
      )
  common.write_json(
    args.json,
    {
      "benchmark": "cam_overhead",
      "args": {k: v for k, v in vars(args).items()},
      "machine": info,
      "memory_label": memory_label,
      "rows": rows,
      "floor_checks": checks,
    },
  )
  return rows


if __name__ == "__main__":
  main()
