"""TensorBoard strips of the first validation examples: image | true-class CAM | human map.

Each strip is one labelled image (`plots.labelled_strip`): the image titled with its true
class and the predicted P(class 1), the true-class CAM overlay (per-map min-max, jet) and, where
the example has one, the human-map overlay. Only the first ``max_images`` examples are kept,
and once they are the evaluator stops asking for images (nothing more is gathered).
"""

from __future__ import annotations

import numpy as np


class CamImages:
  key = "images"
  output_keys = ("maps", "score")

  def __init__(self, ctx, max_images: int = 4):
    self.ctx, self.max_images = ctx, int(max_images)
    self.images: dict[str, np.ndarray] = {}

  @property
  def host_keys(self) -> tuple[str, ...]:
    if len(self.images) >= self.max_images:
      return ()
    return ("image", "label", "has_saliency", "saliency")

  def update(self, host: dict, outputs: dict) -> None:
    from divisive_jax import plots

    cn = self.ctx.class_names
    for i in range(len(host.get("label", ()))):
      if len(self.images) >= self.max_images:
        return
      img, y = host["image"][i], int(host["label"][i])
      score = float(outputs["score"][i])
      panels = [(f"{cn[y]} (P({cn[1]})={score:.2f})", plots.to_rgb_uint8(img))]
      panels.append((f"CAM {cn[y]}", plots.overlay(img, outputs["maps"][i, y], 0.5)))
      if host["has_saliency"][i] > 0:
        panels.append(("human map", plots.overlay(img, host["saliency"][i], 0.5)))
      self.images[f"val_cam/{len(self.images)}"] = plots.labelled_strip(panels)

  def summary(self) -> dict:
    return {"n_images": len(self.images)}
