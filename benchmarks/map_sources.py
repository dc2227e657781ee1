r"""How long computing maps without annotators takes (`divisive_jax.data.map_sources`).

    python benchmarks/map_sources.py --num_train 1000 --image_size 64 \
        --json benchmarks/results/map_sources.json

The training images of the built-in synthetic iris set (``--num_train`` of them at
``--image_size``, RGB), as `load_splits` prepares them; for each source (``pca``, ``lda``) the
median over ``--rounds`` of `map_sources.compute` alone (the SVD, the discriminant, smoothing and
normalisation; reading the split is the data layer's cost, not counted), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_train", type=int, default=1000)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  import ml_collections
  import numpy as np

  from divisive_jax import config_base
  from divisive_jax.data import load_splits, map_sources

  data = config_base.base().data
  data.update(num_train=args.num_train, num_val=8, num_test=8, image_size=args.image_size)
  train = load_splits(ml_collections.ConfigDict(data.to_dict()), "").train
  batch = train.read(np.arange(len(train)))
  rows = []
  for source in ("pca", "lda"):
    times = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      map_sources.compute(batch["image"], batch["label"], source)
      times.append(time.perf_counter() - start)
    rows.append({"source": source, "images": len(train), "seconds": common.median(times)})
    print(
      f"{source}: {len(train)} images at {args.image_size} px in {rows[-1]['seconds']:.2f} s "
      f"(median of {args.rounds})",
      flush=True,
    )
  out = {"benchmark": "map_sources", "args": vars(args), "machine": common.machine_info()}
  common.write_json(args.json or None, {**out, "rows": rows})
  return rows


if __name__ == "__main__":
  main()
