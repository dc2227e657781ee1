"""Evaluators: plug-ins that turn a split's eval-step outputs into figures and files.

Protocol (one per evaluator class; big_vision's ``config.evals`` at this project's scale):

* ``cls(ctx, **options)``: ``ctx`` is a `Context` (split, class names, attack types, task,
  checkpoint step); ``options`` come from ``config.evals.<name>``.
* ``host_keys``: the host fields of a batch it reads (a subset of ``id``, ``label``,
  ``attack_type``, ``has_saliency``, ``saliency``, ``image``); may shrink as it fills (the
  TensorBoard strips stop asking for images). Only these are gathered across processes.
* ``output_keys``: the eval-step outputs it reads (``score``, ``pred``, ``logits``, ``ce``,
  ``maps`` (n, 2, h, w)).
* ``update(host, outputs)``: one batch, valid rows only, in dataset order.
* ``summary() -> dict``: JSON-able figures; ``key`` names where they go in
  ``eval_<split>.json`` (None: merged at the top level).
* optional ``write(directory, summary)``: files (process 0 only).

`evaluation.run_split` feeds a list of evaluators; `make` builds them from ``config.evals``.
"""

from __future__ import annotations

import dataclasses

from divisive_jax.evaluators.alignment import AlignmentEvaluator, EntropyEvaluator
from divisive_jax.evaluators.divergence import DivergenceEvaluator
from divisive_jax.evaluators.images import CamImages
from divisive_jax.evaluators.pad import PadEvaluator

EVALUATORS = {
  "pad": PadEvaluator,
  "alignment": AlignmentEvaluator,
  "entropy": EntropyEvaluator,
  "divergence": DivergenceEvaluator,
  "tb_images": CamImages,
}


@dataclasses.dataclass(frozen=True)
class Context:
  split: str
  class_names: tuple[str, ...]
  attack_types: tuple[str, ...] = ()
  task: str = "pad"
  step: int = 0


def make(evals_config, ctx: Context, **extra) -> list:
  """The evaluators named in ``evals_config`` (a dict of option dicts), in its order.

  ``extra``: keyword arguments for the evaluators that take them by name (e.g. ``val`` for
  ``pad``).
  """
  out = []
  for name, options in evals_config.items():
    cls = EVALUATORS[name]
    options = dict(options)
    options.update({k: v for k, v in extra.items() if k in getattr(cls, "extra_args", ())})
    out.append(cls(ctx, **options))
  return out
