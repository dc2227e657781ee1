r"""Entry point: `python -m divisive_jax.main --config=configs/iris_pad.py[:variant] --workdir=W`.

Overrides: `--config.optim.lr=0.01`, `--config.data.csv_path=/data/protocol.csv`, ...
Multi-host: run the same command on every host with `--distributed` (TPU pods and SLURM are
detected automatically) or with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`.
"""

import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host jobs).")
flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax

  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  from divisive_jax import train

  workdir = FLAGS.workdir or os.path.join("workdirs", FLAGS.config.get("name", "run"))
  train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
