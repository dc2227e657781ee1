r"""Our JAX train step against a PyTorch one on the same backbone, batch and image size.

    /work/venv-torch/bin/python benchmarks/torch_compare.py --model resnet50 --batch 8 \
        --image_size 224 --steps 8 --json /tmp/bench/torch_compare_resnet50.json
    # on a GPU: bf16 (JAX's bfloat16 compute vs torch AMP bf16), channels_last, torch.compile
    python3 benchmarks/torch_compare.py --device cuda --model resnet50 --batch 256 \
        --dtype bfloat16 --channels_last --compile --steps 20 --inner 5 --json OUT.json
    # XLA CPU settings are compared across runs through the ratio to PyTorch (the common
    # in-run reference), e.g.
    /work/venv-torch/bin/python benchmarks/torch_compare.py ... --xla_flags=--xla_cpu_use_onednn=true

Optional: runs only where `torch` and `torchvision` import (a separate venv; never install torch
into the project's venv); otherwise it prints why and exits 0. The repository is put on sys.path,
so the package need not be installed in that venv (it needs jax, flax, optax, orbax,
ml_collections; not the data layer's tensorflow-datasets).

Variants (each for ours and for PyTorch, all interleaved round-robin in ONE process):
* `ce`: cross-entropy training step.
* `cam`: 0.5 * CE + 0.5 * difference-style CAM loss, written the way PyTorch saliency-training
  code (CYBORG's repository style) does it: a forward hook on the last conv features,
  CAM_c = sum_k fc.weight[c, k] * A_k for BOTH classes, contrast = CAM_y - CAM_ybar, per-sample
  min-max normalisation, MSE to the human map downsampled (bilinear, antialiased) to the CAM grid
  and min-max normalised, then backward. Ours is the trainer's step for the `difference` method
  (`config_base.set_method`, `state.build`, `step.make_train_step`), i.e. the same loss.
Both: SGD lr 0.005, momentum 0.9, weight decay 1e-6 (the CYBORG recipe), BatchNorm in train
mode, random init, the same random batch held on the device as uint8 (images and maps, as the
data layer delivers them); each step turns it into normalised floats on the device (ours:
`preprocess` + the model's normalisation; PyTorch: the same arithmetic at the start of its
step). `--dtype bfloat16`: our model computes in bfloat16 (parameters, CAMs and losses float32;
the `accel` variant's setting), PyTorch runs its forward pass under `torch.autocast(bfloat16)`
(AMP) with the CAM loss in float32. `--channels_last`: PyTorch's NHWC memory format (ours is
NHWC always). `--compile`: PyTorch's loss computation through `torch.compile`, guarded: if it
fails the eager step is timed and the error is reported.

Threads (CPU): torch uses `--torch_threads` (default: all cores) intra-op threads; XLA's CPU
client runs its own pool. The two never run at the same time (each step blocks before the next;
on a GPU, `torch.cuda.synchronize` / `block_until_ready`). On a GPU both frameworks allocate
memory as they need it (`XLA_PYTHON_CLIENT_PREALLOCATE=false` unless set).

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
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # as `divisive_jax.models` normalises
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="resnet50", choices=TORCH_MODELS)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="both frameworks")
  p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
  p.add_argument("--inner", type=int, default=1)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--variants", default="ce,cam", help="comma list of ce,cam")
  p.add_argument("--torch_threads", type=int, default=0, help="0: os.cpu_count()")
  p.add_argument("--channels_last", action="store_true", help="PyTorch channels_last memory")
  p.add_argument("--compile", action="store_true", help="torch.compile the PyTorch loss")
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
def torch_runner(
  model_name: str,
  variant: str,
  host: dict,
  *,
  device: str = "cpu",
  dtype: str = "float32",
  channels_last: bool = False,
  torch_compile: bool = False,
):
  """A PyTorch train step on ``host`` (the numpy uint8 NHWC batch of `common.uint8_batch`).

  Returns (step, info): ``step()`` runs one step and returns the detached loss; ``info`` says
  whether torch.compile is in use (and why not) and how long its first step took.
  """
  import torch
  import torch.nn.functional as F
  import torchvision

  dev = torch.device(device)
  torch.manual_seed(0)
  model = getattr(torchvision.models, model_name)(weights=None, num_classes=2)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(dev, memory_format=fmt).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-6)
  # The batch lives on the device as uint8, as ours does.
  x8 = torch.from_numpy(host["image"]).permute(0, 3, 1, 2).to(dev).contiguous(memory_format=fmt)
  y = torch.from_numpy(host["label"]).long().to(dev)
  h8 = torch.from_numpy(host["saliency"])[:, None].to(dev)  # (N, 1, H, W) uint8
  mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
  amp = dtype == "bfloat16"

  if model_name == "densenet121":
    hooked, fc, post = model.features, model.classifier, F.relu  # A = relu(norm5(features))
  else:
    hooked, fc, post = model.layer4, model.fc, (lambda t: t)
  store = {}
  hooked.register_forward_hook(lambda mod, inp, out: store.__setitem__("A", out))

  def minmax(t):  # per-sample over (h, w)
    lo = t.amin(dim=(-2, -1), keepdim=True)
    span = t.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 1e-12, (t - lo) / span.clamp_min(1e-12), torch.zeros_like(t))

  def loss_fn(x8, y, h8):
    x = (x8.float() / 255.0 - mean) / std
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
      logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    if variant == "cam":
      feats = post(store["A"].float())  # (N, C, h, w)
      cams = torch.einsum("kc,nchw->nkhw", fc.weight.float(), feats)  # both classes
      idx = torch.arange(len(y), device=y.device)
      contrast = cams[idx, y] - cams[idx, 1 - y]
      target = F.interpolate(
        h8.float() / 255.0,
        size=contrast.shape[-2:],
        mode="bilinear",
        align_corners=False,
        antialias=True,
      )[:, 0]
      cam_loss = F.mse_loss(minmax(contrast), minmax(target))
      loss = 0.5 * loss + 0.5 * cam_loss
    return loss

  fn = {"loss": loss_fn}

  def step():
    opt.zero_grad(set_to_none=True)
    loss = fn["loss"](x8, y, h8)
    loss.backward()
    opt.step()
    return loss.detach()

  info = {"compiled": False, "compile_error": None, "first_step_s": None}
  if torch_compile:
    fn["loss"] = torch.compile(loss_fn)
  t0 = time.perf_counter()
  try:
    torch_block(step())
    info["compiled"] = torch_compile
  except Exception as e:  # torch.compile is optional: fall back to the eager step
    if not torch_compile:
      raise
    info["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    fn["loss"] = loss_fn
    torch_block(step())
  info["first_step_s"] = time.perf_counter() - t0
  return step, info


def torch_block(out) -> None:
  import torch

  if isinstance(out, torch.Tensor) and out.is_cuda:
    torch.cuda.synchronize(out.device)


def block_any(out) -> None:
  """Wait for a JAX result or a PyTorch tensor."""
  if out is None:
    return
  try:
    import torch

    if isinstance(out, torch.Tensor):
      torch_block(out)
      return
  except ImportError:  # pragma: no cover
    pass
  common.block(out)


# -------------------------------------------------------------------------------------- jax
def jax_runners(args, host: dict, log) -> tuple[dict, dict, dict]:
  """Our train steps (CE, and the `difference` method for `cam`) as the trainer builds them."""
  from divisive_jax import sharding

  runners, compile_s, stats = {}, {}, {}
  batch, state0 = None, None
  for variant in args.variants:
    method = "ce" if variant == "ce" else "difference"
    config = common.bench_config(
      args.model, args.image_size, args.batch, variant=method, dtype=args.dtype
    )
    setup = common.train_setup(config)
    if state0 is None:
      batch = sharding.to_global(host, setup.mesh)
      state0 = common.create_state(setup)
    state = common.state_for(state0, setup)
    run, compiled, compile_s[variant] = common.dispatch_runner(setup, state, common.Repeat(batch))
    stats[variant] = common.compiled_stats(compiled)
    stats[variant].pop("hlo_ops", None)
    runners[variant] = run
    common.block(runners[variant]())
    log(f"[jax] compiled {variant} in {compile_s[variant]:.1f}s")
  return runners, compile_s, stats


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
  if args.device == "cuda":
    if not torch.cuda.is_available():
      raise SystemExit("--device cuda but torch sees no CUDA device")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    common.use_platform("gpu")
  else:
    common.use_platform("cpu", 1)
  common.add_xla_flags(args.xla_flags)
  threads = args.torch_threads or os.cpu_count()
  torch.set_num_threads(threads)
  import jax

  log = print
  info = common.machine_info()
  info["torch_threads"] = torch.get_num_threads()
  info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
  if args.device == "cuda":
    info["torch_device"] = torch.cuda.get_device_name(0)
  log(
    f"machine: {info.get('Model name', '?')}, {info['nproc']} CPUs; torch {torch.__version__} "
    f"({threads} threads, {args.device}), jax {jax.__version__} on {jax.default_backend()}; "
    f"XLA_FLAGS={info['XLA_FLAGS']!r}"
  )
  host = common.uint8_batch(args.batch, args.image_size, 3)
  runners, torch_info = {}, {}
  jax_steps, compile_s, stats = jax_runners(args, host, log)
  for v in args.variants:
    runners[f"jax/{v}"] = jax_steps[v]
    runners[f"torch/{v}"], torch_info[v] = torch_runner(
      args.model,
      v,
      host,
      device=args.device,
      dtype=args.dtype,
      channels_last=args.channels_last,
      torch_compile=args.compile,
    )
    log(f"[torch] {v}: first step {torch_info[v]['first_step_s']:.1f}s, {torch_info[v]}")
  times = common.interleaved(
    runners,
    rounds=args.rounds,
    inner=args.inner,
    warmup=args.warmup,
    blocker=block_any,
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
        "dtype": args.dtype,
        "device": args.device,
        "jax_step_ms": common.median(tj) * 1e3,
        "torch_step_ms": common.median(tt) * 1e3,
        "jax_images_per_s": args.batch / common.median(tj),
        "torch_images_per_s": args.batch / common.median(tt),
        "ours_over_torch_images_per_s": speed,
        "q25": lo,
        "q75": hi,
        "jax_compile_s": compile_s[v],
        "jax_gflops_per_step": stats[v].get("flops", 0) / 1e9,
        "torch_compiled": torch_info[v]["compiled"],
        "torch_compile_error": torch_info[v]["compile_error"],
        "torch_first_step_s": torch_info[v]["first_step_s"],
        "jax_ms_per_round": [t * 1e3 for t in tj],
        "torch_ms_per_round": [t * 1e3 for t in tt],
      }
    )
  overhead = {}
  if {"ce", "cam"} <= set(args.variants):
    for fw in ("jax", "torch"):
      overhead[fw] = common.median([a / b for a, b in zip(times[f"{fw}/cam"], times[f"{fw}/ce"])])
  compiled = any(i["compiled"] for i in torch_info.values())
  print()
  print(
    f"{args.model}, batch {args.batch}, {args.image_size} px, {args.dtype} on {args.device}; "
    f"torch threads {threads}{', channels_last' if args.channels_last else ''}"
    f"{', torch.compile' if compiled else ''}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
    f"{args.rounds} rounds x {args.inner}"
  )
  for v, i in torch_info.items():
    if i["compile_error"]:
      print(f"torch.compile failed for {v}; timed eagerly: {i['compile_error'][:200]}")
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
      "torch": torch_info,
      "jax_compiled_stats": stats,
    },
  )
  return rows


if __name__ == "__main__":
  main()
