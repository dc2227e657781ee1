"""The prepared CSV-protocol records: uncompressed array_record shards and their batched reader.

Each record is a serialized ``tf.train.Example`` (tfds' format) whose ``image`` and ``saliency``
features are the raw bytes of uint8 arrays at training resolution (`csv_dataset.CsvProtocol`).
`TfdsSource` reads a batch of records in one call and copies those bytes into the batch arrays,
without tfds' per-feature decoding.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from divisive_jax.data import pipeline


def rewrite_uncompressed(path: str) -> None:
  """Rewrite an array_record shard without compression (tfds writes zstd; decompressing took
  most of a training read), record by record, with array_record's own reader and writer."""
  reader = array_record_module.ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  tmp = path + ".uncompressed"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1,uncompressed")
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(tmp, path)


class TfdsSource(pipeline.Source):
  """One prepared split as a source of the protocol of `divisive_jax.data`, its columns from the
  builder's metadata."""

  def __init__(self, records, columns: dict[str, list], image_size: int, channels: int):
    self._records = records  # array_record's data source: index -> serialized tf.train.Example
    self.label, self.attack_type, self.has_saliency = (
      np.asarray(columns[k], np.int32) for k in ("label", "attack_type", "has_saliency")
    )
    self.ids = np.asarray(columns["id"], dtype=str)
    self.channels, self._size = channels, image_size
    self._index = np.arange(len(self.label))  # indexed as numpy does: negatives, IndexError

  def _features(self, indices):
    """(the example indices, their parsed features) by protobuf's C parser, no tfds decoding."""
    idx = self._index[np.asarray(indices, np.int64).reshape(-1)]
    records = self._records.__getitems__(idx.tolist()) if len(idx) else []
    return idx, [tf_example_pb2.Example.FromString(r).features.feature for r in records]

  def _column(self, features, key: str) -> np.ndarray:
    shape = (self._size, self._size) + ((self.channels,) if key == "image" else ())
    out = np.empty((len(features),) + shape, np.uint8)
    for k, feature in enumerate(features):
      out[k].reshape(-1)[:] = np.frombuffer(feature[key].bytes_list.value[0], np.uint8)
    return out

  def read(self, indices) -> dict[str, Any]:
    idx, features = self._features(indices)
    return self.batch(idx, self._column(features, "image"), self._column(features, "saliency"))

  def read_maps(self, indices) -> np.ndarray:
    return self._column(self._features(indices)[1], "saliency")
