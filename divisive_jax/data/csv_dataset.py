"""CSV-protocol datasets (SPEC §2) prepared by a TensorFlow-free tfds builder.

Input
-----
* The CSV has no header; one example per row: ``split,class,relative_path[,attack_type]``.
  ``split`` is ``train``, ``val`` or ``test``; ``class`` is one of ``config.data.class_names``
  (its index is the label, class 0 is bona fide); ``relative_path`` is relative to
  ``config.data.image_dir`` (default: the CSV's folder) and is the example's ``id``. Fields are
  whitespace-stripped; blank lines are skipped and listed in ``info['skipped']``. Every split
  must have at least one row and a path may appear only once (a path in two splits would leak).
* Attack types (``config.data.attack_type_from``): ``'none'`` — no types, 3 columns;
  ``'column'`` — the optional 4th column; ``'path'`` — the first directory component of
  ``relative_path`` (``printout/0001.png`` -> ``printout``). Types apply to non-bona-fide rows
  only: class-0 rows always get -1. A non-bona-fide row without a type (empty 4th column, or a
  path without a directory) gets -1 ("unknown"), is listed in ``info['handled']`` and is never
  held out. ``attack_types`` are the sorted distinct names.
* Human maps (``config.data.map_dir``, ``''`` = none) are matched by file name, not by the
  relative directory: the map of ``a/b/eye_01.png`` is ``<map_dir>/eye_01<map_suffix>.<ext>``,
  ext in ``MAP_EXTENSIONS`` (any case). Two candidates for one image are an error. A map is read
  as grayscale float, resized to ``image_size`` (bilinear) and min-max normalised to [0, 1].
  A map whose aspect ratio differs from its image's by more than ``MAX_ASPECT_MISMATCH`` is an
  error; a constant (e.g. all-zero) map carries no saliency: the example is kept with
  ``has_saliency=0``, a warning is logged and the map is listed in ``info['handled']``.
  Images without a map get ``has_saliency=0`` and an all-zero map.
* Images (any size, any PIL-readable format) are converted to ``channels`` (RGB -> gray with
  PIL's ITU-R 601-2 luma, gray replicated to RGB) and resized to ``image_size`` x
  ``image_size`` (bilinear, aspect ratio not kept, as torchvision's ``Resize([S, S])``).

Every problem raises `DataError` naming the CSV path, line, field and the fix; nothing is
dropped silently.

Storage and caching
-------------------
Prepared examples live in ``<data_dir>/csv_protocol/<fingerprint>/<version>`` as array_record
files (images and maps as PNG at ``image_size``; maps quantised to 1/255) and are read with
``builder.as_data_source()`` — no TensorFlow. The fingerprint hashes the CSV bytes, the path,
mtime and size of every image and matched map, and the config fields that change the prepared
bytes (paths, class names, suffix, size, channels, attack-type source). Unchanged inputs reuse
the prepared data; any change prepares a new copy next to the old ones (delete stale
fingerprint folders by hand). tfds writes into a temporary folder and renames it when done,
so an interrupted preparation is never read. With several processes on a shared ``data_dir``,
prepare on one process first (then barrier), or two finishing preparations may collide.
The examples' per-split label / attack-type / map columns and the handled items are stored
in the builder's metadata, so a cache hit reads no image. Preparation decodes and encodes
with a thread pool (PIL releases the GIL) and writes in CSV order.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

SPLITS = ("train", "val", "test")
MAP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_ASPECT_MISMATCH = 1.5
ATTACK_TYPE_SOURCES = ("none", "column", "path")
_FORMAT_VERSION = "1.0.0"  # the builder's version; bump when the stored layout changes
_PREPARE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes/encodes without the GIL
_PREPARE_CHUNK = 256

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Bad data or data config; the message says where (file, line, field) and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One validated CSV row."""

  line: int
  split: str
  label: int
  path: str  # relative to image_dir; the example id
  attack: str  # '' = bona fide or unknown
  map_path: str  # '' = no map


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A parsed and validated CSV protocol: everything that determines the prepared data."""

  csv_path: str
  image_dir: str
  map_dir: str
  class_names: tuple[str, ...]
  map_suffix: str
  image_size: int
  channels: int
  attack_type_from: str
  rows: tuple[Row, ...]
  attack_types: tuple[str, ...]  # sorted distinct names
  skipped: tuple[dict[str, str], ...]

  def fingerprint(self) -> str:
    """Hash of the CSV bytes, every input file's (path, mtime, size) and the config."""
    h = hashlib.sha256()
    fields = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in ("rows", "skipped")
    }
    h.update(json.dumps(fields, sort_keys=True).encode())
    with open(self.csv_path, "rb") as f:
      h.update(f.read())
    for r in self.rows:
      for p in (os.path.join(self.image_dir, r.path), r.map_path):
        st = os.stat(p) if p else None
        h.update(f"{p}|{st and st.st_mtime_ns}|{st and st.st_size}\n".encode())
    return h.hexdigest()[:16]


def _fail(csv_path: str, line: int, where: str, problem: str, fix: str) -> DataError:
  """``where``: 'field 2 (class)' or 'whole row'."""
  return DataError(f"{csv_path}, line {line}, {where}: {problem}. Fix: {fix}.")


def read_protocol(data_config: Any) -> Protocol:
  """Parses and validates ``config.data.csv_path``; raises `DataError` on any bad input."""
  cfg = lambda name, default: getattr(data_config, name, default)
  csv_path = os.path.abspath(cfg("csv_path", ""))
  image_dir = os.path.abspath(cfg("image_dir", "") or os.path.dirname(csv_path))
  map_dir = cfg("map_dir", "")
  map_dir = os.path.abspath(map_dir) if map_dir else ""
  class_names = tuple(cfg("class_names", ("Live", "Spoof")))
  map_suffix = cfg("map_suffix", "")
  attack_type_from = cfg("attack_type_from", "none")
  image_size, channels = int(cfg("image_size", 224)), int(cfg("channels", 3))
  if attack_type_from not in ATTACK_TYPE_SOURCES:
    raise DataError(
      f"config.data.attack_type_from={attack_type_from!r}; use one of {ATTACK_TYPE_SOURCES}."
    )
  if channels not in (1, 3):
    raise DataError(f"config.data.channels={channels}; use 1 (gray) or 3 (RGB).")
  if not os.path.isfile(csv_path):
    raise DataError(f"CSV file {csv_path} not found. Fix --config.data.csv_path.")
  if map_dir and not os.path.isdir(map_dir):
    raise DataError(
      f"map folder {map_dir} not found. Fix --config.data.map_dir or set it to '' for no maps."
    )
  maps = _index_maps(map_dir) if map_dir else {}

  rows, skipped, seen = [], [], {}
  ncols = (3, 4) if attack_type_from == "column" else (3,)
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    for fields in reader:
      line = reader.line_num
      fields = [x.strip() for x in fields]
      if not any(fields):
        skipped.append({"item": f"{csv_path}:{line}", "reason": "blank line"})
        continue
      fail = lambda where, problem, fix: _fail(csv_path, line, where, problem, fix)
      if len(fields) not in ncols:
        hint = (
          " (a 4th column is read only with --config.data.attack_type_from=column)"
          if len(fields) == 4
          else ""
        )
        raise fail(
          "whole row",
          f"{len(fields)} columns, expected {' or '.join(map(str, ncols))}{hint}",
          f"write split,class,relative_path{',attack_type' * (4 in ncols)} on line {line}",
        )
      split, name, path = fields[:3]
      if split not in SPLITS:
        raise fail(
          "field 1 (split)",
          f"unknown split {split!r} (the CSV has no header row)",
          f"use one of {SPLITS} on line {line}",
        )
      if name not in class_names:
        raise fail(
          "field 2 (class)",
          f"class {name!r} is not in class_names {class_names}",
          f"add {name!r} to --config.data.class_names or fix line {line}",
        )
      if not path:
        raise fail("field 3 (relative_path)", "empty path", f"give the image path on line {line}")
      if path in seen:
        raise fail(
          "field 3 (relative_path)",
          f"{path!r} already listed on line {seen[path]}",
          f"list each image once (remove line {line} or line {seen[path]})",
        )
      seen[path] = line
      full = os.path.join(image_dir, path)
      if not os.path.isfile(full):
        raise fail(
          "field 3 (relative_path)",
          f"image {full} not found",
          f"correct the path on line {line} or --config.data.image_dir",
        )
      label = class_names.index(name)
      attack = ""
      if label != 0 and attack_type_from == "column" and len(fields) == 4:
        attack = fields[3]
      elif label != 0 and attack_type_from == "path":
        head, sep, _ = path.partition("/")
        attack = head if sep else ""
      stem = os.path.splitext(os.path.basename(path))[0] + map_suffix
      candidates = maps.get(stem, [])
      if len(candidates) > 1:
        raise fail(
          "field 3 (relative_path)",
          f"several maps match {path!r}: {candidates}",
          f"keep one of them in {map_dir}",
        )
      rows.append(
        Row(
          line,
          split,
          label,
          path,
          attack,
          os.path.join(map_dir, candidates[0]) if candidates else "",
        )
      )
  if not rows:
    raise DataError(
      f"{csv_path}, line 1: the file has no example rows. Fix: write one row "
      "per image: split,class,relative_path[,attack_type]."
    )
  for split in SPLITS:
    if not any(r.split == split for r in rows):
      raise DataError(
        f"{csv_path} has no {split!r} rows; the CSV protocol needs train, val "
        f"and test rows. Fix: add {split!r} rows to {csv_path}."
      )
  attack_types = tuple(sorted({r.attack for r in rows if r.attack}))
  return Protocol(
    csv_path,
    image_dir,
    map_dir,
    class_names,
    map_suffix,
    image_size,
    channels,
    attack_type_from,
    tuple(rows),
    attack_types,
    tuple(skipped),
  )


def _index_maps(map_dir: str) -> dict[str, list[str]]:
  """File-name stem -> map files in ``map_dir`` (flat) with a map extension."""
  index = {}
  for name in sorted(os.listdir(map_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in MAP_EXTENSIONS:
      index.setdefault(stem, []).append(name)
  return index


def _read(path: str, what: str, csv_path: str, line: int) -> PIL.Image.Image:
  try:
    with PIL.Image.open(path) as im:
      im.load()
      return im
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise _fail(
      csv_path,
      line,
      "field 3 (relative_path)",
      f"cannot read {what} {path}: {e}",
      f"replace or remove the file, or remove line {line}",
    ) from e


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, "PNG", compress_level=1)
  return buf.getvalue()


class CsvProtocol(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares a `Protocol`'s examples as array_record files (no TensorFlow)."""

  VERSION = tfds.core.Version(_FORMAT_VERSION)
  # Not a packaged dataset: no checksum or metadata files live beside this code. (tfds'
  # search for them would also import `importlib_resources`, which is not installed.)
  code_path = None

  def __init__(self, protocol: Protocol, data_dir: str):
    self._protocol = protocol
    super().__init__(
      data_dir=data_dir,
      file_format="array_record",
      config=tfds.core.BuilderConfig(name=protocol.fingerprint()),
    )

  def _info(self) -> tfds.core.DatasetInfo:
    p, s = self._protocol, self._protocol.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"CSV protocol data from {p.csv_path}",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(s, s, p.channels)),
          "saliency": tfds.features.Image(shape=(s, s, 1)),
          "has_saliency": tfds.features.Scalar(np.int32),
          "label": tfds.features.ClassLabel(names=p.class_names),
          "attack_type": tfds.features.Scalar(np.int32),
          "id": tfds.features.Text(),
        }
      ),
      disable_shuffling=True,  # keep CSV order: row i of a split is source index i
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    p = self._protocol
    meta = self.info.metadata
    meta.update(
      attack_types=list(p.attack_types),
      skipped=list(p.skipped),
      columns={},
      handled=[
        {
          "item": f"{p.csv_path}:{r.line} ({r.path})",
          "reason": "attack example without attack type: attack_type=-1",
        }
        for r in p.rows
        if r.label != 0 and not r.attack and p.attack_type_from != "none"
      ],
    )
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    p, meta = self._protocol, self.info.metadata
    columns = meta["columns"][split] = {"label": [], "attack_type": [], "has_saliency": []}
    rows = [r for r in p.rows if r.split == split]
    with concurrent.futures.ThreadPoolExecutor(_PREPARE_THREADS) as pool:
      for chunk in range(0, len(rows), _PREPARE_CHUNK):  # bounded memory, CSV order
        chunk = rows[chunk : chunk + _PREPARE_CHUNK]
        for r, (example, map_problem) in zip(
          chunk, pool.map(functools.partial(_prepare_example, p), chunk)
        ):
          if map_problem:
            log.warning("%s: %s", r.map_path, map_problem)
            meta["handled"].append({"item": r.map_path, "reason": map_problem})
          for name in columns:
            columns[name].append(example[name])
          yield r.line, example


def to_model_image(im: PIL.Image.Image, image_size: int, channels: int) -> np.ndarray:
  """A PIL image as the model sees it: uint8 (S, S) or (S, S, 3), bilinear resize to S x S
  (aspect ratio not kept). Shared by data preparation and `divisive_jax.explain`."""
  im = im.convert("L" if channels == 1 else "RGB")
  return np.asarray(im.resize((image_size,) * 2, PIL.Image.BILINEAR))


def _prepare_example(p: Protocol, r: Row) -> tuple[dict[str, Any], str]:
  """The stored example for row ``r`` and why its map was not used ('' if it was / none)."""
  image_path = os.path.join(p.image_dir, r.path)
  im = _read(image_path, "image", p.csv_path, r.line)
  size = im.size
  image = to_model_image(im, p.image_size, p.channels)
  saliency = np.zeros((p.image_size, p.image_size), np.uint8)
  map_problem = ""
  if r.map_path:
    m = _read(r.map_path, "map", p.csv_path, r.line)
    mismatch = (size[0] / size[1]) / (m.size[0] / m.size[1])
    if max(mismatch, 1 / mismatch) > MAX_ASPECT_MISMATCH:
      raise _fail(
        p.csv_path,
        r.line,
        "field 3 (relative_path)",
        f"map {r.map_path} ({m.size[0]}x{m.size[1]}) and image {image_path} "
        f"({size[0]}x{size[1]}) have aspect ratios differing by more than "
        f"{MAX_ASPECT_MISMATCH}x",
        "make the map for this image (same framing) or remove it",
      )
    raw = np.asarray(m if m.mode in ("I", "I;16", "F") else m.convert("L"), np.float32)
    if np.ptp(raw) == 0:
      map_problem = f"constant map (all {raw.flat[0]:g}): treated as missing, has_saliency=0"
    else:
      m = np.asarray(PIL.Image.fromarray(raw, "F").resize((p.image_size,) * 2, PIL.Image.BILINEAR))
      m = (m - m.min()) / max(np.ptp(m), np.finfo(np.float32).tiny)
      saliency = np.round(m * 255).astype(np.uint8)
  return {
    "image": _png(image),
    "saliency": _png(saliency),
    "has_saliency": int(bool(r.map_path) and not map_problem),
    "label": r.label,
    "attack_type": p.attack_types.index(r.attack) if r.attack else -1,
    "id": r.path,
  }, map_problem


class TfdsSource:
  """Random-access source over one prepared split; examples as in `divisive_jax.data`.

  ``label``, ``attack_type`` and ``has_saliency`` are per-example int32 columns readable
  without decoding images.
  """

  def __init__(self, data_source, columns: dict[str, list[int]]):
    self._data_source = data_source
    self.label, self.attack_type, self.has_saliency = (
      np.asarray(columns[k], np.int32) for k in ("label", "attack_type", "has_saliency")
    )

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._data_source[int(index)]
    return {
      "image": ex["image"] * np.float32(1 / 255),
      "label": np.int32(ex["label"]),
      "saliency": ex["saliency"][..., 0] * np.float32(1 / 255),
      "has_saliency": np.float32(ex["has_saliency"]),
      "attack_type": np.int32(ex["attack_type"]),
      "id": ex["id"].decode(),
    }


def load(data_config: Any, workdir: str):
  """Parses, prepares if needed, and opens a CSV protocol.

  Returns ``(sources, class_names, attack_types, info)`` with ``sources`` a dict split ->
  `TfdsSource` in CSV order.
  """
  protocol = read_protocol(data_config)
  data_dir = getattr(data_config, "data_dir", "") or os.path.join(workdir, "data")
  builder = CsvProtocol(protocol, data_dir=os.path.abspath(data_dir))
  prepared_now = not builder.is_prepared()
  start = time.perf_counter()
  builder.download_and_prepare()
  prepare_seconds = time.perf_counter() - start
  meta = builder.info.metadata
  data_sources = builder.as_data_source()
  sources = {s: TfdsSource(data_sources[s], meta["columns"][s]) for s in SPLITS}
  info = {
    "description": f"CSV protocol data from {protocol.csv_path}",
    "source": "csv",
    "csv_path": protocol.csv_path,
    "image_dir": protocol.image_dir,
    "map_dir": protocol.map_dir,
    "prepared_dir": os.fspath(builder.data_path),
    "fingerprint": builder.builder_config.name,
    "prepared_now": prepared_now,
    "prepare_seconds": round(prepare_seconds, 3) if prepared_now else 0.0,
    "skipped": list(meta["skipped"]),
    "handled": list(meta["handled"]),
  }
  return sources, protocol.class_names, tuple(meta["attack_types"]), info
