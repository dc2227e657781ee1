r"""Our JAX train step against a PyTorch one on the same backbone, batch and image size.

    /work/venv-torch/bin/python benchmarks/torch_compare.py --model resnet50 --batch 8 \
        --image_size 224 --steps 8 --json /tmp/bench/torch_compare_resnet50.json
    # XLA CPU settings are compared across runs through the ratio to PyTorch (the common
    # in-run reference), e.g.
    /work/venv-torch/bin/python benchmarks/torch_compare.py ... --xla_flags=--xla_cpu_use_onednn=true

Optional: runs only where `torch` and `torchvision` import (a separate venv; never install torch
into the project's venv); otherwise it prints why and exits 0. The repository is put on sys.path,
so the package need not be installed in that venv (it needs jax, flax, optax, ml_collections).

Variants (each for ours and for PyTorch, all interleaved round-robin in ONE process):
* `ce`: cross-entropy training step.
* `cam`: 0.5 * CE + 0.5 * difference-style CAM loss, written the way PyTorch saliency-training
  code (CYBORG's repository style) does it: a forward hook on the last conv features,
  CAM_c = sum_k fc.weight[c, k] * A_k for BOTH classes, contrast = CAM_y - CAM_ybar, per-sample
  min-max normalisation, MSE to the human map downsampled (bilinear, antialiased) to the CAM grid
  and min-max normalised, then backward. Ours is `step.make_train_step` with the `difference`
  method's weights (`config_base.METHODS['difference']`), i.e. the same loss.
Both: SGD lr 0.005, momentum 0.9, weight decay 1e-6 (the CYBORG recipe), BatchNorm in train
mode, float32, random init, the same random batch (NHWC for JAX, NCHW for PyTorch unless
`--channels_last`).

Threads: torch uses `--torch_threads` (default: all cores) intra-op threads; XLA's CPU client
runs its own pool (Eigen intra-op threads = all cores unless `--xla_cpu_multi_thread_eigen=false`
is passed via --xla_flags). The two never run at the same time (each step blocks before the next).

Reported: median step times, ours/PyTorch images/s ratio (= median over rounds of
t_torch / t_ours; > 1 means ours is faster) for CE and for the CAM loss, and each framework's
CAM/CE step-time ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TORCH_MODELS = ("resnet18", "resnet50", "densenet121")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="resnet50", choices=TORCH_MODELS)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
  p.add_argument("--inner", type=int, default=1)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--variants", default="ce,cam", help="comma list of ce,cam")
  p.add_argument("--torch_threads", type=int, default=0, help="0: os.cpu_count()")
  p.add_argument("--channels_last", action="store_true", help="PyTorch channels_last memory")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS (set before jax starts)")
  p.add_argument("--json", default="")
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  bad = sorted(set(args.variants) - {"ce", "cam"})
  if bad:
    p.error(f"unknown variant(s) {bad}; valid: ce, cam")
  args.rounds = max(1, args.steps // args.inner)
  return args


# ------------------------------------------------------------------------------------ torch
def torch_runner(args, variant: str, host: dict):
  """A PyTorch train step on `host` (numpy NHWC batch) -> callable running one step."""
  import torch
  import torch.nn.functional as F
  import torchvision

  torch.manual_seed(0)
  model = getattr(torchvision.models, args.model)(weights=None, num_classes=2)
  model.train()
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-6)
  x = torch.from_numpy(host["image"]).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  y = torch.from_numpy(host["label"]).long()
  h = torch.from_numpy(host["saliency"])[:, None]  # (N, 1, H, W)

  if args.model == "densenet121":
    hooked, fc, post = model.features, model.classifier, F.relu  # A = relu(norm5(features))
  else:
    hooked, fc, post = model.layer4, model.fc, (lambda t: t)
  store = {}
  hooked.register_forward_hook(lambda mod, inp, out: store.__setitem__("A", out))

  def minmax(t):  # per-sample over (h, w)
    lo = t.amin(dim=(-2, -1), keepdim=True)
    span = t.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 1e-12, (t - lo) / span.clamp_min(1e-12), torch.zeros_like(t))

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if variant == "cam":
      feats = post(store["A"])  # (N, C, h, w)
      cams = torch.einsum("kc,nchw->nkhw", fc.weight, feats)  # both classes
      idx = torch.arange(len(y))
      contrast = cams[idx, y] - cams[idx, 1 - y]
      target = F.interpolate(
        h, size=contrast.shape[-2:], mode="bilinear", align_corners=False, antialias=True
      )[:, 0]
      cam_loss = F.mse_loss(minmax(contrast), minmax(target))
      loss = 0.5 * loss + 0.5 * cam_loss
    loss.backward()
    opt.step()
    return None

  return step


# -------------------------------------------------------------------------------------- jax
def jax_runner(args, variant: str, host: dict, log):
  import jax
  import jax.numpy as jnp
  import ml_collections
  from divisive_jax import config_base, losses, models, optim, step as step_lib

  mesh = step_lib.make_mesh(jax.devices()[:1])
  mcfg = ml_collections.ConfigDict(
    {"name": args.model, "num_outputs": 2, "stem": "imagenet", "width": 64, "dtype": "float32"}
  )
  model = models.get_model(mcfg, bn_axis_name=step_lib.AXIS)
  tx, _ = optim.make_optimizer(config_base.base().optim, 100, 1000)  # SGD recipe

  def init(rng):  # as divisive_jax.train._init_state
    v = model.init(rng, jnp.zeros((1, args.image_size, args.image_size, 3)), train=False)
    return step_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v["params"],
      batch_stats=v["batch_stats"],
      opt_state=tx.init(v["params"]),
    )

  state = jax.jit(init, out_shardings=step_lib.replicated(mesh))(jax.random.key(0))
  method = "ce" if variant == "ce" else "difference"
  cfg = losses.LossConfig(weights=losses.parse_weights(config_base.METHODS[method]))
  batch = step_lib.to_global(host, mesh)
  t0 = time.perf_counter()
  compiled = step_lib.make_train_step(model, cfg, tx, mesh).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  log(f"[jax] compiled {variant} in {compile_s:.1f}s")
  box = {"state": state}

  def step():
    box["state"], m = compiled(box["state"], batch)
    return m

  return step, compile_s, common.compiled_stats(compiled)


def main(argv=None):
  args = parse_args(argv)
  try:
    import torch
    import torchvision  # noqa: F401
  except ImportError as e:
    print(
      f"torch_compare: PyTorch/torchvision not importable ({e}); this comparison is "
      "optional and is skipped. Run it with a venv that has torch + torchvision + the jax "
      "stack, e.g. /work/venv-torch/bin/python benchmarks/torch_compare.py"
    )
    common.write_json(args.json, {"benchmark": "torch_compare", "skipped": True, "reason": str(e)})
    return None
  common.set_host_device_count(1)
  common.add_xla_flags(args.xla_flags)
  threads = args.torch_threads or os.cpu_count()
  torch.set_num_threads(threads)
  import jax

  log = print
  info = common.machine_info()
  info["torch_threads"] = torch.get_num_threads()
  info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
  log(
    f"machine: {info.get('Model name', '?')}, {info['nproc']} CPUs; torch {torch.__version__} "
    f"({threads} threads), jax {jax.__version__}; XLA_FLAGS={info['XLA_FLAGS']!r}"
  )
  host = common.synthetic_batch(args.batch, args.image_size, 3)
  runners, compile_s, stats = {}, {}, {}
  for v in args.variants:
    runners[f"jax/{v}"], compile_s[v], stats[v] = jax_runner(args, v, host, log)
    runners[f"torch/{v}"] = torch_runner(args, v, host)
  times = common.interleaved(
    runners,
    rounds=args.rounds,
    inner=args.inner,
    warmup=args.warmup,
    log=None if args.quiet else log,
  )
  rows = []
  for v in args.variants:
    tj, tt = times[f"jax/{v}"], times[f"torch/{v}"]
    speed = common.median([b / a for a, b in zip(tj, tt)])  # ours images/s / torch images/s
    lo, hi = common.ratio_iqr(tt, tj)
    rows.append(
      {
        "variant": v,
        "model": args.model,
        "batch": args.batch,
        "image_size": args.image_size,
        "jax_step_ms": common.median(tj) * 1e3,
        "torch_step_ms": common.median(tt) * 1e3,
        "jax_images_per_s": args.batch / common.median(tj),
        "torch_images_per_s": args.batch / common.median(tt),
        "ours_over_torch_images_per_s": speed,
        "q25": lo,
        "q75": hi,
        "jax_compile_s": compile_s[v],
        "jax_gflops_per_step": stats[v].get("flops", 0) / 1e9,
        "jax_ms_per_round": [t * 1e3 for t in tj],
        "torch_ms_per_round": [t * 1e3 for t in tt],
      }
    )
  overhead = {}
  if {"ce", "cam"} <= set(args.variants):
    for fw in ("jax", "torch"):
      overhead[fw] = common.median([a / b for a, b in zip(times[f"{fw}/cam"], times[f"{fw}/ce"])])
  print()
  print(
    f"{args.model}, batch {args.batch}, {args.image_size} px, float32; torch threads "
    f"{threads}{', channels_last' if args.channels_last else ''}; "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {args.rounds} rounds x {args.inner}"
  )
  print(
    common.table(
      rows,
      [
        ("variant", "variant"),
        ("jax_step_ms", "ours ms"),
        ("torch_step_ms", "PyTorch ms"),
        ("jax_images_per_s", "ours img/s"),
        ("torch_images_per_s", "PyTorch img/s"),
        ("ours_over_torch_images_per_s", "ours/PyTorch img/s (median)"),
        ("q25", "q25"),
        ("q75", "q75"),
      ],
    )
  )
  for fw, r in overhead.items():
    print(f"{fw}: CAM-loss step / CE step = {r:.3f} (median of per-round ratios)")
  common.write_json(
    args.json,
    {
      "benchmark": "torch_compare",
      "skipped": False,
      "args": vars(args),
      "machine": info,
      "rows": rows,
      "cam_over_ce": overhead,
      "jax_compiled_stats": stats,
    },
  )
  return rows


if __name__ == "__main__":
  main()
