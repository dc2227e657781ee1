r"""Entry point: ``python -m divisive_jax.main --config=configs/iris_pad.py[:variant] --workdir=W``.

Overrides: ``--config.optim.lr=0.01``, ``--config.data.csv_path=/data/protocol.csv``, ... An
unknown field is one line naming it and the closest valid names. With ``--config.population.seeds``
or ``--config.population.weights`` the job is a population (`divisive_jax.members`): N runs
in one program, by the same loop (`divisive_jax.train`). Re-running a workdir resumes
it; a different config is refused unless ``--allow_config_change``. Multi-host: run the same
command on every host with ``--distributed`` (TPU pods and SLURM are detected automatically) or
with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.
"""

import os

from absl import flags
from ml_collections import config_flags

from divisive_jax import cli, multihost

config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a workdir whose config.json differs from this config in fields that change training "
  "(the old config is kept in config_history.jsonl). Without it such a run is refused.",
)
multihost.define_flags()
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  from divisive_jax import train

  workdir = FLAGS.workdir or os.path.join("workdirs", FLAGS.config.name)
  train.train_and_evaluate(FLAGS.config, workdir, FLAGS.allow_config_change)


if __name__ == "__main__":
  cli.run(main)
