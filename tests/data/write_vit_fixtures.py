"""Writes the ViT weight fixtures of tests/test_vit_weights.py with torch, torchvision and timm
themselves (run with a Python that has them; nothing of this project is imported):

    python tests/data/write_vit_fixtures.py tests/data

* ``vit_torchvision.pth``: ``torch.save`` of a torchvision ``VisionTransformer`` state dict
  (16 px, patch 4, 2 blocks of width 16, 2 heads, MLP 32, 2 classes), every parameter random;
* ``vit_timm.safetensors``: a timm ``VisionTransformer`` of the same size (class-token pool);
* ``vit_expected.npz``: the input images (NHWC in [0, 1]), both models' logits, torchvision's
  final-LayerNorm patch tokens, and torchvision's own resampling of the position embeddings to
  32 px (``interpolate_embeddings``) with the 32 px model's logits.
"""

import os
import sys

import numpy as np
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

SIZE = dict(patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=2)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def randomise(net, seed):
  """Every parameter drawn anew (LayerNorm scales around 1), so no zero-initialised part
  (class token, head, biases) hides a wrong mapping."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.3)
  return net.eval()


def logits(net, x):
  normalised = (x - MEAN) / STD
  with torch.no_grad():
    return net(torch.tensor(normalised.transpose(0, 3, 1, 2), dtype=torch.float32)).numpy()


def main(directory):
  x = np.random.default_rng(0).uniform(size=(2, 16, 16, 3))
  tv = randomise(VisionTransformer(image_size=16, **SIZE), 1)
  torch.save(tv.state_dict(), os.path.join(directory, "vit_torchvision.pth"))
  with torch.no_grad():
    t = torch.tensor(((x - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    tokens = tv._process_input(t)
    tokens = torch.cat([tv.class_token.expand(2, -1, -1), tokens], dim=1)
    final = tv.encoder(tokens)[:, 1:].numpy().reshape(2, 4, 4, 16)
  big = interpolate_embeddings(32, 4, tv.state_dict())
  tv32 = VisionTransformer(image_size=32, **SIZE).eval()
  tv32.load_state_dict(big)
  x32 = np.random.default_rng(1).uniform(size=(2, 32, 32, 3))
  tm = timm.models.vision_transformer.VisionTransformer(
    img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=2
  )
  tm = randomise(tm, 2)
  save_file(
    {k: v.contiguous() for k, v in tm.state_dict().items()},
    os.path.join(directory, "vit_timm.safetensors"),
  )
  np.savez(
    os.path.join(directory, "vit_expected.npz"),
    x=x.astype(np.float32),
    torchvision_logits=logits(tv, x),
    torchvision_final_tokens=final,
    x32=x32.astype(np.float32),
    pos_embedding_32=big["encoder.pos_embedding"].numpy(),
    torchvision_logits_32=logits(tv32, x32),
    timm_logits=logits(tm, x),
    versions=np.array(
      f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}"
    ),
  )


if __name__ == "__main__":
  main(sys.argv[1])
