"""Evaluators (plug-ins configured by name in ``config.evals``) and the runner that feeds them:
`divisive_jax.evaluators.common` holds the protocol, the registry and the runner."""

from divisive_jax.evaluators.alignment import AlignmentEvaluator, EntropyEvaluator
from divisive_jax.evaluators.common import (
  EVALUATORS,
  Context,
  eval_batch_size,
  evaluate_checkpoint,
  make,
  run_split,
)
from divisive_jax.evaluators.divergence import DivergenceEvaluator
from divisive_jax.evaluators.images import CamImages
from divisive_jax.evaluators.pad import PadEvaluator


__all__ = [
  "EVALUATORS",
  "AlignmentEvaluator",
  "CamImages",
  "Context",
  "DivergenceEvaluator",
  "EntropyEvaluator",
  "PadEvaluator",
  "eval_batch_size",
  "evaluate_checkpoint",
  "make",
  "run_split",
]
