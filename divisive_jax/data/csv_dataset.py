"""CSV-protocol datasets (as in the CYBORG / iris-PAD repositories), prepared by a tfds builder.

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
  ``map_dir`` (ext in `csv_files.MAP_EXTENSIONS`, any case). The map of ``a/b/x.png`` is
  ``<map_dir>/a/b/x<map_suffix>.<ext>``; failing that, ``x<map_suffix>.<ext>`` in any folder
  when it is the only map file of that name and not the map of another image by the first
  rule. Two candidates for one image, or two images that would share one map, are an error.
  Maps are read as `csv_files.read_map` says; one whose aspect ratio differs from its image's by
  more than `csv_files.MAX_ASPECT_MISMATCH` is an error; a constant (e.g. all-zero) map is kept
  as ``has_saliency=0``, logged and listed in ``info['handled']``. Images without a map get
  ``has_saliency=0`` and an all-zero map. Map files that no image uses are reported on every
  load (cache hits too) in one warning and in ``info`` (`csv_files.unmatched_report`).
* Images (any size, any PIL-readable format) become uint8 ``image_size`` x ``image_size`` with
  ``channels`` channels as `decode.to_model_image` says (ranges kept, never clipped).

Every problem raises `DataError` naming the CSV path, line, field and the fix; nothing is
dropped silently.

Storage and caching
-------------------
Prepared examples live in ``<data_dir>/csv_protocol/<fingerprint>/<version>`` as array_record
files of uncompressed tf.train.Example records holding decoded arrays at training resolution,
read with no image decoding and no TensorFlow (`TfdsSource`): ``image`` uint8 (S, S, C),
``saliency`` uint8 (S, S), the min-max normalised map quantised to 1/255 (``round(255 m)``;
zeros when absent). C is 1 when ``channels`` is 1 or every image is single-channel (PIL modes
`decode.GRAY_MODES`, from the headers; the device replicates gray data, which travel at a
third of the bytes), else 3. An example takes S*S*(C+1) bytes (224 px RGB: 196 KiB). The
fingerprint hashes the CSV bytes, the path, mtime and size of every image and matched map, and
the config fields that change the prepared bytes. Unchanged inputs reuse the prepared data;
any change prepares a new copy next to the old ones (delete stale fingerprint folders by
hand); data of another format version are prepared again, with one log line. tfds writes into
a temporary folder and renames it when done, so an interrupted preparation is never read. With
several processes on a shared ``data_dir``, prepare on one process first (then barrier), or
two finishing preparations may collide. The per-split label, attack-type, map and id columns
and the handled items are in the builder's metadata, so a cache hit reads no image.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from divisive_jax import layout
from divisive_jax.data import csv_files, csv_records
from divisive_jax.data.csv_files import SPLITS
from divisive_jax.data.csv_files import to_model_image as to_model_image  # for the tests
from divisive_jax.data.csv_records import TfdsSource
from divisive_jax.errors import DataError

ATTACK_TYPE_SOURCES = ("none", "column", "path")
# The builder's version; bump when the stored layout or the prepared bytes of the same inputs
# change (1.1.0: 16-bit and float images read with their real range, normalised ids; 2.0.0:
# decoded uint8 arrays instead of PNG, gray data with one channel, ids in the metadata).
_FORMAT_VERSION = "2.0.0"
_FORMATS = {"1": "PNG", "2": "uint8 arrays"}  # major version -> stored layout, for the log
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
  map_dir = os.path.abspath(cfg("map_dir", "")) if cfg("map_dir", "") else ""
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
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    for fields in reader:
      line = reader.line_num
      fields = [x.strip() for x in fields]
      if not any(fields):
        skipped.append({"item": f"{csv_path}:{line}", "reason": "blank line"})
        continue
      split, label, path, attack = csv_files.check_row(
        fields, line, csv_path, image_dir, class_names, attack_type_from, seen
      )
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
  config = (csv_path, image_dir, map_dir, class_names, map_suffix, image_size, channels)
  counts = (len(maps.files), maps.other_files)
  return Protocol(
    *config, attack_type_from, tuple(rows), attack_types, tuple(skipped), counts, tuple(unmatched)
  )


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
      # The version read now (not at import): the config's version names the folder.
      config=tfds.core.BuilderConfig(name=protocol.fingerprint(), version=_FORMAT_VERSION),
    )

  # tfds prints "Downloading and preparing dataset ..." to stdout in bold; nothing is downloaded
  # here, so our own log line says what happens instead.
  def _log_download_bytes(self) -> None:
    p = self._protocol
    log.info(
      "Preparing %d images of %s at %d px into %s (once: reused until the CSV, the files "
      "or the data fields change)",
      len(p.rows),
      p.csv_path,
      p.image_size,
      self.data_dir,
    )

  def _log_download_done(self) -> None:
    pass

  def _download_and_prepare(self, *args, **kwargs):
    out = super()._download_and_prepare(*args, **kwargs)
    # Our shards, still in the preparation folder (`csv_records.rewrite_uncompressed`: why).
    for name in sorted(os.listdir(self.data_dir)):
      if ".array_record" in name:
        csv_records.rewrite_uncompressed(os.path.join(self.data_dir, name))
    return out

  @functools.cached_property
  def stored_channels(self) -> int:
    """`csv_files.stored_channels`, or the prepared features' when prepared (opens no image)."""
    if os.path.isfile(os.path.join(self.data_dir, "features.json")):
      return int(tfds.features.FeatureConnector.from_config(self.data_dir)["image"].shape[-1])
    return csv_files.stored_channels(self._protocol)

  def _info(self) -> tfds.core.DatasetInfo:
    p, s = self._protocol, self._protocol.image_size
    # Raw bytes: nothing to decode, and no up-casting to int64 (tf.train.Example's only int).
    array = lambda shape: tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="bytes")
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"CSV protocol data from {p.csv_path}",
      features=tfds.features.FeaturesDict(
        dict(
          image=array((s, s, self.stored_channels)),
          saliency=array((s, s)),
          has_saliency=tfds.features.Scalar(np.int32),
          label=tfds.features.ClassLabel(names=p.class_names),
          attack_type=tfds.features.Scalar(np.int32),
          id=tfds.features.Text(),
        )
      ),
      disable_shuffling=True,  # keep CSV order: row i of a split is source index i
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    p, meta = self._protocol, self.info.metadata
    unknown = "attack example without attack type: attack_type=-1"
    meta.update(attack_types=list(p.attack_types), skipped=list(p.skipped), columns={})
    meta["handled"] = [
      {"item": f"{p.csv_path}:{r.line} ({r.path})", "reason": unknown}
      for r in p.rows
      if r.label != 0 and not r.attack and p.attack_type_from != "none"
    ]
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    p, meta = self._protocol, self.info.metadata
    columns = meta["columns"][split] = {k: [] for k in ("label", "attack_type", "has_saliency")}
    columns["id"] = []
    rows = [r for r in p.rows if r.split == split]
    prepare = functools.partial(csv_files.prepare_example, p, channels=self.stored_channels)
    with concurrent.futures.ThreadPoolExecutor(_PREPARE_THREADS) as pool:
      for chunk in range(0, len(rows), _PREPARE_CHUNK):  # bounded memory, CSV order
        chunk = rows[chunk : chunk + _PREPARE_CHUNK]
        for r, (example, map_problem) in zip(chunk, pool.map(prepare, chunk)):
          if map_problem:
            log.warning("%s: %s", r.map_path, map_problem)
            meta["handled"].append({"item": r.map_path, "reason": map_problem})
          for name in columns:
            columns[name].append(example[name])
          yield r.line, example


def _rebuild_message(builder: CsvProtocol) -> str | None:
  """The log line when these inputs were prepared in another format version (None if not)."""
  folder, new = os.path.dirname(builder.data_dir), str(builder.version)
  names = os.listdir(folder) if os.path.isdir(folder) else ()
  done = lambda v: tfds.core.Version.is_valid(v) and os.path.isfile(f"{folder}/{v}/features.json")
  old = max((tfds.core.Version(v) for v in names if v != new and done(v)), default=None)
  layout = lambda v: _FORMATS.get(str(v).split(".")[0], "another layout")
  return old and (
    f"Prepared data in {folder} were written in format {old} ({layout(old)}); "
    f"preparing them again as {new} ({layout(new)})"
  )


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
  data_dir = getattr(data_config, "data_dir", "") or layout.path(workdir, layout.DATA)
  tfds.disable_progress_bar()  # no progress bars with escape codes in log files
  builder = CsvProtocol(protocol, data_dir=os.path.abspath(data_dir))
  prepared_now = not builder.is_prepared()
  if prepared_now and (message := _rebuild_message(builder)):
    log.warning("%s", message)
  start = time.perf_counter()
  builder.download_and_prepare()
  prepare_seconds = time.perf_counter() - start
  meta = builder.info.metadata
  size, channels = protocol.image_size, builder.stored_channels
  records = builder.as_data_source(deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  sources = {s: TfdsSource(records[s], meta["columns"][s], size, channels) for s in SPLITS}
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
    "stored_channels": channels,
    "skipped": list(meta["skipped"]),
    "handled": list(meta["handled"]),
    **unmatched,
  }
  return sources, protocol.class_names, tuple(meta["attack_types"]), info
