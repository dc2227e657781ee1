"""Data layer: splits of random-access sources, and the batches built from them.

``load_splits(config.data, workdir)`` returns `Splits`: ``train``/``val``/``test`` sources,
``class_names`` and ``attack_types``, and a JSON-able ``info`` dict. Data come from a CSV
protocol when ``config.data.csv_path`` is set (`csv_dataset`), else from the built-in set
``config.data.builtin`` (`synthetic`: ``'synthetic_iris'`` (default) or ``'shortcut'``).

Source protocol (every source: CSV, built-in, a `Selection`, explain's image files):
* ``len(src)``; int32 columns ``src.label``, ``src.attack_type``, ``src.has_saliency`` and the
  ids ``src.ids`` (one entry per example, readable without decoding images);
* ``src.channels``: the stored channel count, 1 (gray) or 3 (RGB); gray data are replicated to
  ``config.data.channels`` on the device, so they travel at a third of the bytes;
* ``src.read(indices)`` -> a batch dict of numpy arrays, decoded, at training resolution:
  ``image`` uint8 (n, H, W, channels); ``saliency`` uint8 (n, H, W), the human map quantised
  to 1/255 (zeros when absent); ``has_saliency`` float32 0/1; ``label`` int32;
  ``attack_type`` int32 index into ``attack_types`` (-1 = bona fide or unknown); ``id`` str
  (unique within a split); ``src[i]`` is row i of ``read([i])``.
Images and maps stay uint8 until the jitted step: scaling to [0, 1], gray -> RGB and
augmentation happen on the device (`divisive_jax.preprocess`). `data.pipeline` batches
sources.

Open-set protocol (``config.data.heldout_attack = T``, leave one attack type out):
  * train = train minus every example of type T;
  * val   = val minus every example of type T (thresholds chosen on val never see T);
  * test  = the bona fide test examples, then every example of type T from train, val and
    test (in that order). Attacks of other (seen) types and of unknown type leave test, so
    test measures detection of the unseen type against bona fide; unused T examples of
    train/val are not wasted.
  ``info['protocol']`` records this; counts in ``info`` are after the protocol.

``info`` keys: ``description`` (one line), ``source``, ``class_names``, ``attack_types``,
``heldout_attack``, ``protocol``, ``counts`` (per split: ``total``, per class name, and
``attack_types`` per type name), ``map_coverage`` (per split: fraction with a map),
``map_source`` (`map_sources`: ``source``, and how many training maps are ``human``,
``withheld`` (``config.data.human_map_fraction``) or ``computed``), ``saliency_control`` (`controls`: the training maps' control, from
``config.data.seed``),
``skipped`` and ``handled`` (lists of ``{'item', 'reason'}``), plus source-specific keys
(see `csv_dataset.load`, `synthetic.load`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from divisive_jax import layout
from divisive_jax.data import controls, csv_dataset, map_sources, pipeline, synthetic
from divisive_jax.errors import DataError

__all__ = ["CHOICES", "Selection", "Splits", "describe", "load_splits", "load_splits_once"]
# The data settings with a fixed set of values (checked by `config_base.validate`).
CHOICES = {"saliency_control": controls.CONTROLS, "map_source": map_sources.SOURCES}


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Any
  val: Any
  test: Any
  class_names: tuple[str, ...]
  attack_types: tuple[str, ...]
  info: dict[str, Any]


class Selection(pipeline.Source):
  """A source made of chosen examples of other sources: ``parts`` = [(source, indices)]."""

  def __init__(self, parts: Sequence[tuple[Any, np.ndarray]]):
    parts = [(source, np.asarray(i, np.int64)) for source, i in parts]
    self._parts = [source for source, _ in parts]
    channels = {source.channels for source in self._parts}
    if len(channels) > 1:
      raise ValueError(f"a selection mixes sources of {sorted(channels)} channels")
    self.channels = channels.pop()
    self._part = np.concatenate([np.full(len(i), k) for k, (_, i) in enumerate(parts)])
    self._index = np.concatenate([i for _, i in parts])
    column = lambda name: np.concatenate([np.asarray(getattr(s, name))[i] for s, i in parts])
    self.label, self.attack_type, self.has_saliency = (
      column(name).astype(np.int32) for name in ("label", "attack_type", "has_saliency")
    )
    self.ids = column("ids")

  def read(self, indices) -> dict[str, Any]:
    indices = np.asarray(indices, np.int64)
    part, index = self._part[indices], self._index[indices]
    if len(indices) == 0:
      return self._parts[0].read(np.zeros(0, np.int64))
    batches = {k: self._parts[k].read(index[part == k]) for k in np.unique(part)}
    out = {}
    for key, first in next(iter(batches.values())).items():
      strings = first.dtype.kind in "USO"
      col = np.empty((len(indices),) + first.shape[1:], object if strings else first.dtype)
      for k, b in batches.items():
        col[part == k] = b[key]
      out[key] = col.astype(str) if strings else col
    return out


def leave_one_attack_out(train, val, test, attack: int):
  """The open-set protocol of the module docstring for attack-type index ``attack``."""
  without = lambda s: (s, np.flatnonzero(s.attack_type != attack))
  only = lambda s: (s, np.flatnonzero(s.attack_type == attack))
  return (
    Selection([without(train)]),
    Selection([without(val)]),
    Selection([(test, np.flatnonzero(test.label == 0)), only(train), only(val), only(test)]),
  )


def _counts(source, class_names, attack_types) -> dict[str, Any]:
  count = lambda column, names: {name: int(np.sum(column == k)) for k, name in enumerate(names)}
  return {
    "total": len(source),
    **count(source.label, class_names),
    "attack_types": count(source.attack_type, attack_types),
  }


def load_splits(data_config: Any, workdir: str) -> Splits:
  """Loads (preparing if needed) the data that ``data_config`` names; see module docstring.

  With several processes and a CSV protocol, call it on one process first (then barrier)
  when the data may need preparing; see `csv_dataset`.
  """
  if getattr(data_config, "csv_path", ""):
    sources, class_names, attack_types, info = csv_dataset.load(data_config, workdir)
  else:
    sources, class_names, attack_types, info = synthetic.load(data_config)
  train, val, test = (sources[s] for s in ("train", "val", "test"))
  heldout = getattr(data_config, "heldout_attack", "")
  protocol = "closed set: the splits as given"
  if heldout:
    if heldout not in attack_types:
      raise DataError(
        f"config.data.heldout_attack={heldout!r} is not an attack type of this data "
        f"(attack types: {attack_types or 'none; set config.data.attack_type_from'}). "
        "Fix: use one of them or set it to ''."
      )
    train, val, test = leave_one_attack_out(train, val, test, attack_types.index(heldout))
    protocol = (
      f"open set, {heldout!r} held out: removed from train and val; test = bona "
      f"fide test examples + all {heldout!r} examples of train, val and test"
    )
  data_dir = getattr(data_config, "data_dir", "") or (
    layout.path(workdir, layout.DATA) if workdir else ""
  )
  source = getattr(data_config, "map_source", "human")
  fraction = float(getattr(data_config, "human_map_fraction", 1.0))
  seed = int(getattr(data_config, "seed", 0))
  train, info["map_source"] = map_sources.apply(train, source, data_dir, fraction, seed)
  control = getattr(data_config, "saliency_control", "none")
  train = controls.apply(train, control, seed)
  splits = {"train": train, "val": val, "test": test}
  info.update(
    saliency_control=control,
    class_names=list(class_names),
    attack_types=list(attack_types),
    heldout_attack=heldout,
    protocol=protocol,
    counts={s: _counts(src, class_names, attack_types) for s, src in splits.items()},
    map_coverage={
      s: float(np.mean(src.has_saliency)) if len(src) else 0.0 for s, src in splits.items()
    },
  )
  return Splits(train, val, test, tuple(class_names), tuple(attack_types), info)


def describe(data_config) -> str:
  """The run's first log line: which data it trains on (and the maps' source, share and control
  where they are not the defaults)."""
  control = ""
  if data_config.human_map_fraction < 1:
    control += (
      f" Human maps kept on {data_config.human_map_fraction:g} of the training examples that "
      "have one (`data.map_sources`)."
    )
  if data_config.map_source != "human":
    control += f" Training examples without a human map get {data_config.map_source} maps."
  if data_config.saliency_control != "none":
    control += (
      f" Saliency control {data_config.saliency_control!r}: the training maps are replaced "
      "(`data.controls`); validation and test keep the true maps."
    )
  if data_config.csv_path:
    return (
      f"Training on CSV-protocol data {data_config.csv_path} (images {data_config.image_dir},"
      f" maps {data_config.map_dir or 'none'}, classes {tuple(data_config.class_names)})." + control
    )
  return (
    f"Training on the built-in synthetic '{data_config.builtin}' set: no data paths given "
    "(set --config.data.csv_path, --config.data.image_dir and --config.data.map_dir to "
    "train on your own data)." + control
  )


def load_splits_once(data_config, workdir: str) -> Splits:
  """`load_splits` in a job of several processes: process 0 prepares CSV data first (one
  cache build on a shared filesystem) while the others wait, then they read it."""
  import jax

  from divisive_jax import multihost

  if jax.process_count() == 1 or not data_config.csv_path:
    return load_splits(data_config, workdir)
  splits, problem = None, None
  if multihost.is_lead():
    try:
      splits = load_splits(data_config, workdir)
    except Exception as e:  # noqa: BLE001 - the others must not wait for it forever
      problem = e
  if not multihost.all_agree(problem is None):  # a collective: also the barrier
    raise problem or DataError("process 0 could not prepare the data; see its log")
  return splits or load_splits(data_config, workdir)
