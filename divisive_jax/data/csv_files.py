"""The files a CSV protocol names (see `csv_dataset` for the rules): reading images and maps for
storage (decoded by `decode`), row checks, path normalisation, matching maps to images,
unused-map reports."""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath

import numpy as np
import PIL.Image

from divisive_jax.data.decode import GRAY_MODES, still_and_opaque, to_model_image
from divisive_jax.errors import DataError

MAP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_ASPECT_MISMATCH = 1.5
SPLITS = ("train", "val", "test")
UNMATCHED_LISTED = 100  # at most this many unmatched map paths are stored in ``info``


def fail(csv_path: str, line: int, where: str, problem: str, fix: str) -> DataError:
  """``where``: 'field 2 (class)' or 'whole row'."""
  return DataError(f"{csv_path}, line {line}, {where}: {problem}. Fix: {fix}.")


# ------------------------------------------------------------------------------ images
def read_image(path: str, what: str, csv_path: str, line: int, load: bool = True):
  """The decoded PIL image at ``path`` (``load=False``: its mode only, from the header); still
  and opaque (`decode.still_and_opaque`, checked while the file is open: frames are counted
  there)."""
  err = lambda problem, fix: fail(csv_path, line, "field 3 (relative_path)", problem, fix)
  try:
    with PIL.Image.open(path) as im:
      if not load:
        return im.mode
      im.load()
      still_and_opaque(im, f"{what} {path}")
  except DataError as e:
    problem, _, fix = str(e).partition(". Fix: ")
    raise err(problem, fix) from None
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    fix = f"replace or remove the file, or remove line {line}"
    raise err(f"cannot read {what} {path}: {e}", fix) from e
  return im


def stored_channels(p) -> int:
  """The channel count protocol ``p``'s images are stored with: 1 when ``p.channels`` is 1 or
  every image's PIL mode (read from its header, no decoding) is in `GRAY_MODES`; else 3."""
  for r in p.rows if p.channels == 3 else ():
    path = os.path.join(p.image_dir, r.path)
    if read_image(path, "image", p.csv_path, r.line, load=False) not in GRAY_MODES:
      return 3
  return 1


def prepare_example(p, r, channels: int) -> tuple[dict, str]:
  """Row ``r`` of protocol ``p`` (`csv_dataset`) as stored, and why its map is unused ('' if used
  or none): image uint8 (S, S, ``channels``), gray kept unreplicated when ``channels`` is 1 (the
  same pixels: PIL converts and resizes each channel alike), map uint8 (S, S) (`read_map`)."""
  image_path, at = os.path.join(p.image_dir, r.path), (p.csv_path, r.line)
  im = read_image(image_path, "image", *at)
  try:
    if channels < p.channels and im.mode not in GRAY_MODES:  # the header said gray
      raise DataError(f"{image_path} changed during preparation (now {im.mode}). Fix: rerun")
    image = to_model_image(im, p.image_size, channels, image_path)
  except DataError as e:
    raise DataError(f"{p.csv_path}, line {r.line}, field 3 (relative_path): {e}") from None
  saliency, map_problem = np.zeros((p.image_size, p.image_size), np.uint8), ""
  if r.map_path:
    saliency, map_problem = read_map(r.map_path, image_path, im.size, p.image_size, *at)
  return {
    "image": image.reshape(image.shape[:2] + (channels,)),
    "saliency": saliency,
    "has_saliency": int(bool(r.map_path) and not map_problem),
    "label": r.label,
    "attack_type": p.attack_types.index(r.attack) if r.attack else -1,
    "id": r.path,
  }, map_problem


def read_map(
  map_path: str, image_path: str, image_wh: tuple[int, int], size: int, csv_path: str, line: int
) -> tuple[np.ndarray, str]:
  """A map as uint8 (S, S) saliency, min-max normalised, and why it is not used ('' if it is).

  Read as grayscale float (16-bit and float maps keep their range), resized bilinearly."""
  m = read_image(map_path, "map", csv_path, line)
  err = lambda problem, fix: fail(csv_path, line, "field 3 (relative_path)", problem, fix)
  mismatch = (image_wh[0] / image_wh[1]) / (m.size[0] / m.size[1])
  if max(mismatch, 1 / mismatch) > MAX_ASPECT_MISMATCH:
    raise err(
      f"map {map_path} ({m.size[0]}x{m.size[1]}) and image {image_path} "
      f"({image_wh[0]}x{image_wh[1]}) have aspect ratios differing by more than "
      f"{MAX_ASPECT_MISMATCH}x",
      "make the map for this image (same framing) or remove it",
    )
  raw = m if m.mode in ("I", "F") or m.mode.startswith("I;16") else m.convert("L")
  raw = np.asarray(raw).astype(np.float32)
  if not np.all(np.isfinite(raw)):
    raise err(f"map {map_path} has NaN or infinite values", "save the map with finite values")
  if np.ptp(raw) == 0:
    problem = f"constant map (all {raw.flat[0]:g}): treated as missing, has_saliency=0"
    return np.zeros((size, size), np.uint8), problem
  m = np.asarray(PIL.Image.fromarray(raw, "F").resize((size, size), PIL.Image.BILINEAR))
  m = (m - m.min()) / max(np.ptp(m), np.finfo(np.float32).tiny)
  return np.round(m * 255).astype(np.uint8), ""


# -------------------------------------------------------------------------------- rows
def check_row(fields, line, csv_path, image_dir, class_names, attack_type_from, seen):
  """``(split, label, id, attack type or '')`` of a non-blank row's stripped ``fields``; ``seen``
  (real path -> (line, split, path as written)) finds files listed twice and is updated. Raises
  `DataError` naming the line, the field and the fix."""
  ncols = (3, 4) if attack_type_from == "column" else (3,)
  err = lambda where, problem, fix: fail(csv_path, line, where, problem, fix)
  if len(fields) not in ncols:
    hint = " (a 4th column is read only with --config.data.attack_type_from=column)"
    hint *= len(fields) == 4
    raise err(
      "whole row",
      f"{len(fields)} columns, expected {' or '.join(map(str, ncols))}{hint}",
      f"write split,class,relative_path{',attack_type' * (4 in ncols)} on line {line}",
    )
  split, name, path = fields[:3]
  if split not in SPLITS:
    raise err(
      "field 1 (split)",
      f"unknown split {split!r} (the CSV has no header row)",
      f"use one of {SPLITS} on line {line}",
    )
  if name not in class_names:
    raise err(
      "field 2 (class)",
      f"class {name!r} is not in class_names {class_names}",
      f"add {name!r} to --config.data.class_names or fix line {line}",
    )
  if not path:
    raise err("field 3 (relative_path)", "empty path", f"give the image path on line {line}")
  path, real = normalise(path, image_dir)
  if real in seen:
    raise duplicate(csv_path, line, split, fields[2], *seen[real])
  seen[real] = (line, split, fields[2])
  full = os.path.join(image_dir, path)
  if not os.path.isfile(full):
    raise err(
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
  return split, label, path, attack


# ------------------------------------------------------------------------------- paths
def normalise(path: str, image_dir: str) -> tuple[str, str]:
  """``(id, real path)`` of a CSV path. The id is ``os.path.normpath`` with forward slashes,
  relative to ``image_dir`` (also for an absolute path inside it); the real path resolves
  symlinks and is the key of the duplicate check."""
  full = os.path.normpath(os.path.join(image_dir, path))
  ident = os.path.normpath(path)
  if os.path.isabs(path):
    for inner, outer in ((full, image_dir), (os.path.realpath(full), os.path.realpath(image_dir))):
      rel = os.path.relpath(inner, outer)
      if not _outside(rel.replace(os.sep, "/")):
        ident = rel
        break
  return ident.replace(os.sep, "/"), os.path.realpath(full)


def duplicate(
  csv_path: str, line: int, split: str, spelling: str, first: int, first_split: str, first_as: str
) -> DataError:
  """The error for a file listed again on ``line`` (as ``spelling``) after line ``first``."""
  same = "" if spelling == first_as else f" is the same file as {first_as!r},"
  splits = sorted({first_split, split}, key=SPLITS.index)
  into = "training" if splits[0] == "train" else "validation"
  leak = f", in two splits ({' and '.join(splits)}): this leaks {splits[-1]} data into {into}"
  leak *= len(splits) == 2
  return fail(
    csv_path,
    line,
    "field 3 (relative_path)",
    f"{spelling!r}{same} already listed on line {first}{leak}",
    f"list each image once (remove line {line} or line {first})",
  )


def _outside(ident: str) -> bool:
  """Whether an id is not a path inside ``image_dir`` (absolute, or starting with '..')."""
  return posixpath.isabs(ident) or ident == ".." or ident.startswith("../")


# -------------------------------------------------------------------------------- maps
@dataclasses.dataclass(frozen=True)
class MapIndex:
  """The map files under ``map_dir`` (recursive), as paths relative to it with '/'."""

  files: tuple[str, ...]
  by_folder: dict[tuple[str, str], list[str]]  # (folder, name without extension) -> files
  by_name: dict[str, list[str]]  # name without extension -> files, in any folder
  other_files: int  # files without a map extension


def index_maps(map_dir: str) -> MapIndex:
  files, by_folder, by_name, other = [], {}, {}, 0
  for root, dirs, names in os.walk(map_dir):
    dirs.sort()
    folder = os.path.relpath(root, map_dir).replace(os.sep, "/")
    folder = "" if folder == "." else folder
    for name in sorted(names):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in MAP_EXTENSIONS:
        other += 1
        continue
      rel = posixpath.join(folder, name)
      files.append(rel)
      by_folder.setdefault((folder, stem), []).append(rel)
      by_name.setdefault(stem, []).append(rel)
  return MapIndex(tuple(files), by_folder, by_name, other)


def match_maps(
  items: list[tuple[int, str]], index: MapIndex, suffix: str, csv_path: str, map_dir: str
) -> list[str]:
  """The map (relative to ``map_dir``, '' = none) of each ``(line, id)``: by relative path,
  else by file name when exactly one map has that name and no other image shares it."""
  wanted = []  # (folder, map name without extension, maps in that folder)
  for _, ident in items:
    folder, name = posixpath.split(ident)
    key = os.path.splitext(name)[0] + suffix
    wanted.append((folder, key, [] if _outside(ident) else index.by_folder.get((folder, key), [])))
  claimed = {m for _, _, direct in wanted for m in direct}
  found, users = [], {}
  for (line, ident), (folder, key, direct) in zip(items, wanted):
    err = lambda problem, fix: fail(csv_path, line, "field 3 (relative_path)", problem, fix)
    want = f"{posixpath.join(map_dir, '' if _outside(ident) else folder, key)}.<ext>"
    named = index.by_name.get(key, [])
    if len(direct) > 1:
      raise err(f"several maps match {ident!r}: {direct}", f"keep one of them in {map_dir}")
    if not direct and len(named) > 1 and not set(named) <= claimed:
      raise err(
        f"several maps match {ident!r} by file name: {named[:5]} (none is at {want})",
        f"put this image's map at {want} (a map in the image's relative folder is used "
        "first), or keep one of them",
      )
    found.append(direct[0] if direct else named[0] if named and named[0] not in claimed else "")
    if found[-1] in users:
      first_line, first = users[found[-1]]
      raise err(
        f"{ident!r} and {first!r} (line {first_line}) would share the map {found[-1]}",
        f"give each image its own map: put the maps in the same relative folders under "
        f"{map_dir} as the images under image_dir (e.g. {want})",
      )
    if found[-1]:
      users[found[-1]] = (line, ident)
  return found


CAUSES = {  # short name -> the loud warning's explanation
  "different folder": "{n} have the file name of an image's map but lie in another folder than "
  "the map used (e.g. {map} for image {image}): remove them or put each in its image's folder",
  "case mismatch": "{n} match an image's map name only if upper/lower case is ignored (e.g. "
  "{map} for image {image}): names are case-sensitive, rename the maps",
  "map_suffix": "{n} match an image's name with another suffix (e.g. {map} for image {image}): "
  "check config.data.map_suffix (it is {suffix!r}; these maps suggest {found!r})",
  "no image": "{n} have no CSV image of their name in any folder, in any case, with or "
  "without map_suffix (e.g. {map}): expected only if the CSV lists part of the data",
}


def unmatched_maps(index: MapIndex, used: set[str], ids: list[str], suffix: str) -> list[tuple]:
  """``(map, cause, example image, suffix the name suggests)`` for every map file no image
  uses; the cause (a key of `CAUSES`) is detected from the names, not guessed."""
  stems, lower = {}, {}
  for ident in ids:
    stem = os.path.splitext(posixpath.basename(ident))[0]
    stems.setdefault(stem, ident)
    lower.setdefault((stem + suffix).lower(), ident)
  out = []
  for m in index.files:
    if m in used:
      continue
    name = os.path.splitext(posixpath.basename(m))[0]
    base = name[: len(name) - len(suffix)] if name.endswith(suffix) else None
    if base in stems:
      out.append((m, "different folder", stems[base], suffix))
    elif name.lower() in lower:
      out.append((m, "case mismatch", lower[name.lower()], suffix))
    else:  # the longest image name the map's name starts with, followed by a separator
      for k in range(len(name), 0, -1):
        rest = name[k:]
        if name[:k] in stems and (not rest or not rest[0].isalnum()):
          out.append((m, "map_suffix", stems[name[:k]], rest))
          break
      else:
        out.append((m, "no image", "", ""))
  return out


def unmatched_report(
  unmatched: list[tuple], total: int, other: int, map_dir: str, suffix: str
) -> tuple[dict, str]:
  """``(info entries, warning or '')`` for the unmatched maps (of ``total`` map files; ``other``
  files have no map extension). The warning is one line: loud (causes counted, an example and
  the fix each) when more than 5 maps, or more than 10% of them and at least 2, are
  unmatched; else it lists the few with their causes."""
  n = len(unmatched)
  counts = collections.Counter(cause for _, cause, *_ in unmatched)
  info = {
    "unmatched_maps": [m for m, *_ in unmatched[:UNMATCHED_LISTED]],
    "unmatched_maps_count": n,
    "unmatched_maps_causes": dict(counts),
  }
  if map_dir and not total:
    return info, (
      f"no map files under {map_dir} ({other} other file(s); map extensions: "
      f"{', '.join(MAP_EXTENSIONS)}): every image trains without a map"
    )
  if not n:
    return info, ""
  head = f"{n} of {total} map files under {map_dir} match no CSV image and are not used"
  if not (n > 5 or (n >= 2 and n > 0.1 * total)):
    items = "; ".join(
      f"{m} ({cause}{f': image {img}' if img else ''}"
      f"{f', suffix {found!r} not {suffix!r}' if cause == 'map_suffix' else ''})"
      for m, cause, img, found in unmatched
    )
    return info, f"{head}: {items}. (Listed in data_info.json 'unmatched_maps'.)"
  parts = []
  for cause, k in counts.most_common():
    m, _, img, found = next(u for u in unmatched if u[1] == cause)
    parts.append(CAUSES[cause].format(n=k, map=m, image=img, suffix=suffix, found=found))
  return info, (
    f"MAPS NOT USED: {head} ({100 * n / total:.0f}%; listed in data_info.json "
    f"'unmatched_maps'). Likely cause: {'; '.join(parts)}."
  )
