"""CSV-protocol datasets (SPEC §2) prepared by a TensorFlow-free tfds builder.

Input
-----
* The CSV has no header; one example per row: ``split,class,relative_path[,attack_type]``.
  ``split`` is ``train``, ``val`` or ``test``; ``class`` is one of ``config.data.class_names``
  (its index is the label, class 0 is bona fide); ``relative_path`` is relative to
  ``config.data.image_dir`` (default: the CSV's folder). Fields are whitespace-stripped; blank
  lines are skipped and listed in ``info['skipped']``. Every split needs a row.
* The example's ``id`` is the path normalised (``os.path.normpath``, '/' separators; an
  absolute path inside ``image_dir`` becomes relative to it, one outside stays absolute). A
  file is listed once: two spellings of one file (``./x.png``, ``a/../x.png``, an absolute
  path, a symlink: compared by ``os.path.realpath``) are an error, which says when the two rows
  are in different splits (test data leaking into training).
* Attack types (``config.data.attack_type_from``): ``'none'`` — no types, 3 columns;
  ``'column'`` — the optional 4th column; ``'path'`` — the first directory of the ``id``
  (``printout/0001.png`` -> ``printout``). Types apply to non-bona-fide rows only: class-0
  rows always get -1. A non-bona-fide row without a type (empty 4th column, or a path without
  a directory) gets -1 ("unknown"), is listed in ``info['handled']`` and is never held out.
  ``attack_types`` are the sorted distinct names.
* Human maps (``config.data.map_dir``, ``''`` = none) are searched recursively under
  ``map_dir`` (ext in ``MAP_EXTENSIONS``, any case). The map of ``a/b/x.png`` is
  ``<map_dir>/a/b/x<map_suffix>.<ext>``; failing that, ``x<map_suffix>.<ext>`` in any folder
  (e.g. all maps in one flat folder) when it is the only map file of that name and not the
  map of another image by the first rule. Two candidates for one image, or two images that
  would share one map (``live/x.png`` and ``print/x.png`` with one flat ``x_blended.png``),
  are an error: put the maps in the images' relative folders. A map is read as grayscale
  float, resized to ``image_size`` (bilinear) and min-max normalised to [0, 1]. A map whose
  aspect ratio differs from its image's by more than ``MAX_ASPECT_MISMATCH`` is an error; a
  constant (e.g. all-zero) map carries no saliency: the example is kept with
  ``has_saliency=0``, a warning is logged and the map is listed in ``info['handled']``.
  Images without a map get ``has_saliency=0`` and an all-zero map.
* Map files that no image uses are reported on every load (cache hits too) in one warning
  and in ``info``: ``unmatched_maps`` (relative to ``map_dir``, the first 100),
  ``unmatched_maps_count`` and ``unmatched_maps_causes`` (detected from the names: ``case
  mismatch``, ``map_suffix``, ``different folder``, ``no image``). Above 5 maps, or 10% of
  them (at least 2), the warning is loud: each cause with an example and the fix.
* Images (any size, any PIL-readable format) are converted to ``channels`` (RGB -> gray with
  PIL's ITU-R 601-2 luma, gray replicated to RGB) and resized to ``image_size`` x
  ``image_size`` (bilinear, aspect ratio not kept, as torchvision's ``Resize([S, S])``) as
  uint8. 16-bit gray images (modes ``I;16*``; mode ``I`` if all values are in 0..65535) are
  scaled by value / 65535, float ones (mode ``F``) must lie in [0, 1]; both are resized in
  float and rounded (16-bit: round(value / 257), so 257 x an 8-bit image gives exactly that
  image's input). Other ranges are errors, never clipped (`to_model_image`).

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

from divisive_jax.data import csv_files
from divisive_jax.data.csv_files import MAP_EXTENSIONS as MAP_EXTENSIONS
from divisive_jax.data.csv_files import MAX_ASPECT_MISMATCH as MAX_ASPECT_MISMATCH
from divisive_jax.data.csv_files import DataError, to_model_image
from divisive_jax.data.csv_files import fail as _fail

SPLITS = ("train", "val", "test")
ATTACK_TYPE_SOURCES = ("none", "column", "path")
# The builder's version; bump when the stored layout or the prepared bytes of the same inputs
# change (1.1.0: 16-bit and float images read with their real range, normalised ids).
_FORMAT_VERSION = "1.1.0"
_PREPARE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes/encodes without the GIL
_PREPARE_CHUNK = 256

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Row:
  """One validated CSV row."""

  line: int
  split: str
  label: int
  path: str  # normalised, relative to image_dir if inside it; the example id
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
  map_files: tuple[int, int]  # files under map_dir: (maps, others)
  unmatched_maps: tuple[tuple[str, str, str, str], ...]  # see `csv_files.unmatched_maps`

  def fingerprint(self) -> str:
    """Hash of the CSV bytes, every input file's (path, mtime, size) and the config."""
    h = hashlib.sha256()
    fields = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in ("rows", "skipped", "map_files", "unmatched_maps")
    }
    h.update(json.dumps(fields, sort_keys=True).encode())
    with open(self.csv_path, "rb") as f:
      h.update(f.read())
    for r in self.rows:
      for p in (os.path.join(self.image_dir, r.path), r.map_path):
        st = os.stat(p) if p else None
        h.update(f"{p}|{st and st.st_mtime_ns}|{st and st.st_size}\n".encode())
    return h.hexdigest()[:16]


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
  maps = csv_files.index_maps(map_dir) if map_dir else csv_files.MapIndex((), {}, {}, 0)

  rows, skipped, seen = [], [], {}  # seen: real path -> (line, split, path as written)
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
      path, real = csv_files.normalise(path, image_dir)
      if real in seen:
        raise csv_files.duplicate(csv_path, line, split, fields[2], *seen[real])
      seen[real] = (line, split, fields[2])
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
        attack = head if sep and head != ".." else ""
      rows.append(Row(line, split, label, path, attack, ""))
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
  found = csv_files.match_maps(
    [(r.line, r.path) for r in rows], maps, map_suffix, csv_path, map_dir
  )
  rows = [
    dataclasses.replace(r, map_path=m and os.path.join(map_dir, m)) for r, m in zip(rows, found)
  ]
  unmatched = csv_files.unmatched_maps(maps, set(found), [r.path for r in rows], map_suffix)
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
    (len(maps.files), maps.other_files),
    tuple(unmatched),
  )


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


def _prepare_example(p: Protocol, r: Row) -> tuple[dict[str, Any], str]:
  """The stored example for row ``r`` and why its map was not used ('' if it was / none)."""
  image_path = os.path.join(p.image_dir, r.path)
  im = csv_files.read_image(image_path, "image", p.csv_path, r.line)
  size = im.size
  try:
    image = to_model_image(im, p.image_size, p.channels, image_path)
  except DataError as e:
    raise DataError(f"{p.csv_path}, line {r.line}, field 3 (relative_path): {e}") from None
  saliency = np.zeros((p.image_size, p.image_size), np.uint8)
  map_problem = ""
  if r.map_path:
    saliency, map_problem = csv_files.read_map(
      r.map_path, image_path, size, p.image_size, p.csv_path, r.line
    )
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
  unmatched, warning = csv_files.unmatched_report(
    list(protocol.unmatched_maps), *protocol.map_files, protocol.map_dir, protocol.map_suffix
  )
  if warning:
    log.warning("%s", warning)
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
    **unmatched,
  }
  return sources, protocol.class_names, tuple(meta["attack_types"]), info
