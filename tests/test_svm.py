"""The classical SVM baseline (``mmjax/svm.py``): its features, its kernel,
its choice of hyper-parameters, and runs on a small ``mm_shapes/simple``."""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np
import pytest
from sklearn import svm as sklearn_svm

import e2e
from mmjax import svm


def _svm_config(data_dir: str, **svm_fields):
  """``experiments/mm_shapes.py:svm,runlocal`` on the small dataset."""
  config = e2e.load_experiment("mm_shapes").get_config("svm,runlocal")
  config.dataset.data_dir = data_dir
  config.svm.update(svm_fields)
  return config


def _blobs(num_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Three overlapping Gaussian classes in 5 dimensions: inputs ``[3n, 5]``
  and labels ``[3n]``."""
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(3), num_per_class)
  x = rng.normal(size=(len(y), 5)) + 1.5 * np.eye(3, 5)[y]
  return x.astype(np.float32), y


def test_bag_of_words_counts_every_word_but_padding():
  ids = np.array([[2, 3, 2, 0], [1, 4, 4, 4], [0, 0, 0, 0]])
  # Columns: ids 1 (unknown), 2, 3, 4.
  expected = [[0, 2, 1, 0], [1, 0, 0, 3], [0, 0, 0, 0]]
  np.testing.assert_array_equal(svm.bag_of_words(ids, vocab_size=5), expected)


def test_modality_features_and_views_have_the_documented_shapes():
  batch = {"image": np.zeros((4, 32, 32, 3), np.float32),
           "question": np.ones((4, 16), np.int32),
           "answer": np.zeros(4, np.int64)}
  features = svm.modality_features(batch, ("image", "question"),
                                   {"question": 23})
  assert {m: x.shape for m, x in features.items()} == {
      "image": (4, 3072), "question": (4, 22)}
  assert features["question"][:, 0].tolist() == [16] * 4  # 16 unknown words.
  assert {k: x.shape for k, x in svm.views(features, "concat").items()} == {
      "image+question": (4, 3094)}
  assert svm.views(features, "per_modality").keys() == features.keys()


def test_standardisation_uses_the_train_statistics_only():
  rng = np.random.default_rng(0)
  train = rng.normal(3.0, 2.0, size=(50, 3)).astype(np.float32)
  train[:, 2] = 7.0  # A constant column is only centred.
  val = rng.normal(-1.0, 5.0, size=(20, 3)).astype(np.float32)
  scaler = svm.fit_standardizer(train)
  out = svm.standardize({"x": train, "v": val}, {"x": scaler, "v": scaler})
  np.testing.assert_allclose(out["x"][:, :2].mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(out["x"][:, :2].std(0), 1, atol=1e-5)
  np.testing.assert_array_equal(out["x"][:, 2], 0)
  mean, std = train[:, :2].mean(0), train[:, :2].std(0)
  np.testing.assert_allclose(out["v"][:, :2], (val[:, :2] - mean) / std,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["v"][:, 2], val[:, 2] - 7.0)


def test_precomputed_kernel_is_scikit_learns_rbf_svm():
  x, y = _blobs(30, seed=0)
  x_test, _ = _blobs(10, seed=1)
  # Solved to a tight tolerance, so that only the kernels' rounding differs.
  reference = sklearn_svm.SVC(C=3.0, gamma="scale", tol=1e-8).fit(x, y)
  gamma = svm.scale_gamma(x)
  # pylint: disable-next=protected-access
  assert gamma == pytest.approx(reference._gamma, rel=1e-6)
  ours = sklearn_svm.SVC(kernel="precomputed", C=3.0, tol=1e-8).fit(
      svm.rbf_kernel(svm.squared_distances(x, x), gamma), y)
  np.testing.assert_array_equal(ours.support_, reference.support_)
  np.testing.assert_allclose(
      svm.class_scores(ours, svm.rbf_kernel(svm.squared_distances(x_test, x),
                                            gamma)),
      reference.decision_function(x_test), atol=1e-5)


def test_the_grid_point_most_accurate_on_validation_is_kept():
  assert svm.best_grid_point([{"validation_accuracy": a}
                              for a in (0.5, 0.7, 0.7, 0.6)]) == 1
  x, y = _blobs(40, seed=0)
  x_val, y_val = _blobs(40, seed=1)
  grid = dict(C=(0.01, 1.0, 100.0), gamma_factors=(0.1, 30.0))
  fit = svm.fit_view("x", x, y, x_val, y_val, ml_collections.ConfigDict(grid),
                     sklearn_svm.SVC)
  accuracies = [p["validation_accuracy"] for p in fit.grid]
  assert len(set(accuracies)) > 1  # The grid points really differ.
  assert fit.chosen == svm.best_grid_point(fit.grid)
  chosen = fit.grid[fit.chosen]
  assert (fit.svc.C, fit.gamma) == (chosen["C"], chosen["gamma"])
  labels = svm.decide([svm.view_scores(fit, x, x_val)], fit.svc.classes_)
  assert np.mean(labels == y_val) == max(accuracies)


@pytest.mark.slow
def test_main_fits_the_svm_and_writes_the_table_keys(data_dir, tmp_path):
  e2e.run([sys.executable, "-m", "mmjax.main",
           "--config=experiments/mm_shapes.py:svm,runlocal",
           f"--workdir={tmp_path}", f"--config.dataset.data_dir={data_dir}"])
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert {"validation", "test", "num_params", "train_seconds",
          "examples_per_sec", "grid_search_seconds", "svm"} <= set(results)
  assert os.path.exists(tmp_path / "config.json")
  assert os.path.exists(tmp_path / "vocab" / "question.json")
  view = results["svm"]["views"]["image+question"]
  assert results["svm"]["train_examples"] == e2e.SMALL_SPLITS["train"]
  assert [p["C"] for p in view["grid"]] == [10.0, 10.0, 100.0, 100.0]
  assert results["validation"]["accuracy"] == max(
      p["validation_accuracy"] for p in view["grid"])
  # Support vectors x features, dual coefficients (classes - 1 each),
  # one-vs-one intercepts, mean and std of every feature.
  support, classes = sum(view["num_support"]), len(view["num_support"])
  assert results["num_params"] == (support * view["features"] +
                                   support * (classes - 1) +
                                   classes * (classes - 1) // 2 +
                                   2 * view["features"])
  # Chance: the test split's most frequent answer, 0.156 (15 of 96). The SVM
  # (C=100, gamma=0.1*scale chosen) scores 0.333.
  assert results["test"]["accuracy"] > 0.25


def test_per_modality_svms_decide_together(data_dir, tmp_path):
  config = _svm_config(data_dir, features="per_modality")
  results = svm.train_and_evaluate(config, str(tmp_path))
  assert set(results["svm"]["views"]) == {"image", "question"}
  with open(tmp_path / "vocab" / "question.json") as f:
    words = json.load(f)
  # A column per word and one for unknown words.
  assert results["svm"]["views"]["question"]["features"] == len(words) + 1
  assert results["test"]["accuracy"] > 0.25  # Measured: 0.354; chance 0.156.


def test_errors_name_the_problem(data_dir, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="Unknown config.svm.features 'early'"):
    svm.train_and_evaluate(_svm_config(data_dir, features="early"),
                           str(tmp_path / "a"))
  config = _svm_config(data_dir)
  config.model.heads.answer.target = "num_objects"
  with pytest.raises(ValueError, match="'num_objects' is not a classification"):
    svm.train_and_evaluate(config, str(tmp_path / "b"))
  monkeypatch.setitem(sys.modules, "sklearn", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[svm\]'"):
    svm.train_and_evaluate(_svm_config(data_dir), str(tmp_path / "c"))
