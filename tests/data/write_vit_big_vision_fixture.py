"""Writes the big_vision ViT fixtures of tests/test_vit_weights.py with big_vision's own model
code (``big_vision/models/vit.py`` of a big_vision checkout; run with this project's Python,
which has jax and flax):

    python tests/data/write_vit_big_vision_fixture.py /path/to/big_vision tests/data

Only the model file is executed: the modules it imports for checkpoint loading
(``big_vision.utils``, ``big_vision.models.common``, which need TensorFlow) are empty stand-ins,
and nothing of them runs when a model is built and applied.

* ``vit_big_vision_tok.npz``: ``pool_type='tok'``, learned position embeddings, one module per
  block, keys as big_vision's ``.npz`` checkpoints name them (``Transformer/encoderblock_0/...``);
* ``vit_big_vision_gap.npz``: ``pool_type='gap'``, ``posemb='sincos2d'`` (no parameter), the
  scanned encoder (``Transformer/encoderblock/...`` with a leading block axis), under
  ``params/`` as big_vision's training checkpoints;
* ``vit_big_vision_expected.npz``: the inputs (normalised as our models normalise them) and both
  models' logits.
"""

import os
import sys
import types

import flax
import jax
import numpy as np

KW = dict(num_classes=2, patch_size=(4, 4), width=16, depth=2, mlp_dim=32, num_heads=2)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def big_vision_vit(repo):
  for name in ("big_vision", "big_vision.models", "big_vision.utils", "big_vision.models.common"):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules["big_vision"].utils = sys.modules["big_vision.utils"]
  sys.modules["big_vision.models"].common = sys.modules["big_vision.models.common"]
  module = types.ModuleType("big_vision.models.vit")
  path = os.path.join(repo, "big_vision", "models", "vit.py")
  exec(compile(open(path).read(), path, "exec"), module.__dict__)
  return module


def randomised(params, seed):
  """Every parameter drawn anew (LayerNorm scales around 1; the zero-initialised head too)."""
  leaves, tree = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed)
  new = []
  for path, x in leaves:
    scale = "scale" in jax.tree_util.keystr(path)
    new.append(rng.uniform(0.5, 1.5, x.shape) if scale else rng.normal(0, 0.3, x.shape))
  return jax.tree.unflatten(tree, [np.asarray(x, np.float32) for x in new])


def main(repo, directory):
  vit = big_vision_vit(repo)
  x = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  normalised = ((x - MEAN) / STD).astype(np.float32)
  expected = {"x": x}
  for pool, posemb, scan, prefix, seed in (
    ("tok", "learn", False, "", 3),
    ("gap", "sincos2d", True, "params/", 4),
  ):
    model = vit.Model(**KW, pool_type=pool, posemb=posemb, scan=scan)
    params = model.init(jax.random.key(0), normalised)["params"]
    params = randomised(flax.core.unfreeze(params), seed)
    logits, _ = model.apply({"params": params}, normalised)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    np.savez(
      os.path.join(directory, f"vit_big_vision_{pool}.npz"),
      **{prefix + k: v for k, v in flat.items()},
    )
    expected[f"{pool}_logits"] = np.asarray(logits)
  np.savez(os.path.join(directory, "vit_big_vision_expected.npz"), **expected)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
