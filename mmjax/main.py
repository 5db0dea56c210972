"""Runs an experiment file.

    python -m mmjax.main --config=experiments/mm_shapes.py --workdir=/tmp/mmjax/film
    python -m mmjax.main --config=experiments/mm_shapes.py:fusion=concat \
        --workdir=/tmp/mmjax/concat --config.train.steps=500

Any config field can be overridden with ``--config.a.b=value``. Running the
same command again on the same workdir resumes from its newest checkpoint.
A config with an ``svm`` section (``experiments/mm_shapes.py:svm``) fits the
SVM baseline (``mmjax.svm``) instead of training.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, optionally with ':arguments'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "metrics and results.", required=True)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes.
    logging.set_verbosity(logging.WARNING)
  from mmjax import parallel  # pylint: disable=g-import-not-at-top
  from mmjax import svm  # pylint: disable=g-import-not-at-top
  from mmjax import train  # pylint: disable=g-import-not-at-top
  parallel.use_cpu_devices(_CONFIG.value.parallel.cpu_devices)
  parallel.initialize_distributed()
  run = (svm.train_and_evaluate if "svm" in _CONFIG.value
         else train.train_and_evaluate)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
