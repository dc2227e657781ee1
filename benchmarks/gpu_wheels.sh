#!/usr/bin/env bash
# The wheels the GPU benchmark machine lacks, for Python 3.12 on manylinux x86_64, into .whl/
# (git-ignored) at the repository root; the device tool carries that folder (carry=[".whl"]).
#
#   bash benchmarks/gpu_wheels.sh            # here, with network
#   # there, no network (benchmarks/gpu.py's docstring):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT
#
# That machine has jax/jaxlib (CUDA 13), flax, optax, orbax-checkpoint, numpy, pillow,
# matplotlib, tensorboard, protobuf, absl-py, etils, pyyaml, pyarrow, psutil, requests, tqdm,
# wrapt, six, attrs, torch + torchvision (the device README's package list). What
# `import divisive_jax.train` and the CSV data path need beyond that, found by importing them in a
# Python 3.12 venv holding only that machine's packages, with these wheels installed exactly as
# above:
#   ml_collections, clu                                       (config, parameter overview)
#   tensorflow-datasets, array_record                         (the CSV data layer)
#   toml, promise, immutabledict, tensorflow-metadata         (imported by tensorflow_datasets)
#   dm-tree                                                   (tfds' as_data_source)
#   protobuf                                                  (see below)
# tensorflow-datasets' other requirements (simple_parsing, termcolor, googleapis-common-protos,
# ...) are not imported on this path. tensorflow-metadata's generated code refuses a protobuf
# runtime older than 6.31.1 (checked: with protobuf 5.29 `import divisive_jax.data` fails), and
# the GPU machine's protobuf version is not known here, so the version this project tests with
# (7.36.2, with tensorboard 2.21) comes along and shadows the machine's for our processes only
# (PYTHONPATH). promise has no wheel on PyPI (sdist only): it is built here (pure Python).
# Versions as pyproject.toml pins them.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" \
  ml_collections==1.1.0 \
  clu==0.0.12 \
  tensorflow-datasets==4.9.10 \
  array_record==0.8.6 \
  toml==0.10.2 \
  immutabledict==4.3.1 \
  tensorflow-metadata==1.21.0 \
  dm-tree==0.1.10 \
  protobuf==7.36.2
python3 -m pip wheel -q --no-deps -w "$DEST" promise==2.3
ls -l "$DEST"
du -sh "$DEST"
