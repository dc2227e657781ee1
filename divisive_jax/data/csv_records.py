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

  def read(self, indices) -> dict[str, Any]:
    idx = self._index[np.asarray(indices, np.int64).reshape(-1)]
    s, c = self._size, (self.channels,)
    image, saliency = (np.empty((len(idx), s, s) + shape, np.uint8) for shape in (c, ()))
    records = self._records.__getitems__(idx.tolist()) if len(idx) else []
    for k, record in enumerate(records):  # protobuf's C parser; no tfds feature decoding
      feature = tf_example_pb2.Example.FromString(record).features.feature
      image[k].reshape(-1)[:] = np.frombuffer(feature["image"].bytes_list.value[0], np.uint8)
      saliency[k].reshape(-1)[:] = np.frombuffer(feature["saliency"].bytes_list.value[0], np.uint8)
    return self.batch(idx, image, saliency)
