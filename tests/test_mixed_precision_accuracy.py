"""``mm_shapes`` trains to the same accuracy in bfloat16 as in float32
(``config.model.dtype``; the parts' numerics are ``test_mixed_precision.py``).
"""

import concurrent.futures
import json

import pytest

from mmjax import models

import e2e

# 5,000 test questions: a standard error under 0.8 points for each accuracy.
ACCURACY_SPLITS = {"train": 20_000, "validation": 100, "test": 5_000}
# e2e's small FiLM model (runlocal) with the paper's classifier, 400 steps of
# batch 64, 3 seeds in one program: the accuracy is their mean.
ACCURACY_RUN = {"train.steps": 400, "input.batch_size": 64,
                "train.num_seeds": 3, "model.fusion.classifier": "paper",
                "train.log_every_steps": 100, "train.eval_every_steps": 400,
                "checkpoint.every_steps": 400, "eval.batch_size": 1000}
# Answers are balanced within each question type, so the question alone gets
# about 1/3 right (the README's question-only baseline: 0.334).
QUESTION_ONLY_ACCURACY = 0.334


@pytest.fixture(scope="module")
def accuracy_data_dir(tmp_path_factory):
  return e2e.build_small_mm_shapes(str(tmp_path_factory.mktemp("tfds")),
                                   ACCURACY_SPLITS)


def _test_accuracy(workdir, data_dir, dtype: str) -> float:
  """Trains through ``python -m mmjax.main --config.model.dtype=<dtype>``;
  returns the test accuracy from ``results.json`` (the seeds' mean)."""
  e2e.run(e2e.command(workdir, data_dir,
                      *e2e.flags({**ACCURACY_RUN, "model.dtype": dtype})))
  return json.loads((workdir / "results.json").read_text())["test"]["accuracy"]


@pytest.mark.slow
def test_mm_shapes_in_bfloat16_reaches_the_float32_accuracy(
    tmp_path, accuracy_data_dir):
  """Same seeds, same data orders: over 3 seeds, bfloat16's mean falls at
  most 1 point short of float32's (the requirement), and neither is far
  from the other.

  One seed is not enough at this budget: the runs are not at a plateau, so
  rounding differences make them different models. Measured per seed
  (0, 1, 2), float32 0.575, 0.547, 0.579 and bfloat16 0.557, 0.554, 0.597:
  the gap is -1.8, +0.7 and +1.7 points, and the means are 0.567 and 0.569.
  The check stays one-sided, as the requirement is.
  """
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    accuracy = dict(zip(models.DTYPES, pool.map(
        lambda dtype: _test_accuracy(tmp_path / dtype, accuracy_data_dir,
                                     dtype), models.DTYPES)))
  assert min(accuracy.values()) > QUESTION_ONLY_ACCURACY + 0.1, accuracy
  assert accuracy["bfloat16"] >= accuracy["float32"] - 0.01, accuracy
  assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.03, accuracy
