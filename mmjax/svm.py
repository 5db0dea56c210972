"""The classical SVM baseline: ``train_and_evaluate(config, workdir)``.

The counterpart of ``mmjax.train.train_and_evaluate`` for the baseline of the
classic multimodal pipeline: a kernel SVM on flattened, standardised inputs.
A config with an ``svm`` section selects it (``experiments/mm_shapes.py:svm``,
``experiments/avmnist.py:svm``) and ``mmjax.main`` runs it instead of
training; ``config.model`` then only names the modalities and the target.

Features: every modality of ``config.model.modalities``, read from the
dataset and preprocessed by ``config.input.pp_eval`` (what the model sees in
evaluation: normalised images, tokenized text; no augmentation), then

* images, spectrograms: flattened, ``[examples, height * width * channels]``;
* text (the fields ``pp_eval`` tokenizes): bag-of-words counts of the token
  ids, ``[examples, vocabulary size - 1]`` (every id but padding), over the
  run's own vocabulary, built from the train split and saved in
  ``workdir/vocab/`` as training does;

each column standardised with the mean and standard deviation of the train
subsample (a constant column is only centred).

``config.svm.features`` (``FEATURES``):

* ``"concat"``: one SVM on every modality's features concatenated;
* ``"per_modality"``: one SVM per modality, each with the hyper-parameters
  best on validation for it alone, deciding together by the mean of their
  one-vs-rest decision values (scikit-learn's ``decision_function``: each
  class's one-vs-one votes plus a confidence under 1/3). Decision values,
  not probabilities: Platt scaling (``probability=True``) would cost five
  more fits per SVM.

The SVM is scikit-learn's ``SVC`` (libsvm) with the RBF kernel
``exp(-gamma * |x - y|^2)``, which this module computes with matrix products
and passes as ``kernel="precomputed"``: the same SVM (solved to a tight
tolerance, the same support vectors and decision values to 1e-5;
``tests/test_svm.py``). libsvm's own
kernel is a scalar loop over the features: on 2,000 AV-MNIST examples
(13,328 features) its fit took 353 s on the 2-core CPU machine, against
0.5 s for distances, kernel and fit here. The squared distances, computed
once, serve every ``gamma`` of the grid. ``gamma`` is given as factors of
scikit-learn's ``gamma="scale"``: ``1 / (features * variance of the
standardised train features)``.

A kernel SVM trains in memory and time quadratic in its examples: it trains
on ``config.svm.max_train_examples`` examples of the train split, drawn with
``config.seed`` (all of them if fewer). Each point of the grid ``C x
gamma_factors`` is fit on them and scored on the validation split; the most
accurate (on ties the first in grid order: smaller ``C``, then smaller
``gamma``) is evaluated on every split of ``config.dataset.eval_splits``.

``results.json`` holds what the sweep tables read: ``{split: {"accuracy"}}``
for each eval split and validation; ``num_params`` (see ``num_params``);
``train_seconds``, the chosen model's training time (its train kernel and
fit, for each SVM); ``examples_per_sec``, training examples per second of
it; ``grid_search_seconds``, the whole selection (every fit, the validation
kernels and scores); and ``svm``: the features, the subsample's size and,
per SVM, the chosen ``C`` and ``gamma``, its support vectors and every grid
point's validation accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmjax import config_lib
from mmjax import train
from mmjax.data import pipeline
from mmjax.data import preprocess
from mmjax.data.tokenizer import Vocabulary

FEATURES = ("concat", "per_modality")
VALIDATION = "validation"  # The split that chooses the hyper-parameters.
_READ_CHUNK = 1024  # Examples read and featurised at a time.


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Fits the SVM baseline of ``config`` in ``workdir`` and returns the
  contents of ``results.json`` (also written there, with ``config.json``)."""
  config_lib.validate_config(config)
  check_svm_config(config)
  svc_class = _import_svc()
  # Writes config.json; refuses a workdir that holds another experiment.
  train.prepare_workdir(workdir, config)
  builder = train.prepare_dataset(config.dataset)
  target = classification_target(config, builder)
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = pipeline.load_or_build_vocabularies(
      config.dataset, config.input, preprocessing.text_keys, workdir)
  pp = preprocess.build_pp(preprocessing.eval, vocabularies)

  train_split = config.dataset.train_split
  num_train = len(pipeline.data_source(config.dataset, config.input,
                                       train_split))
  rows = subsample(num_train, config.svm.max_train_examples, config.seed)
  print(f"SVM baseline ({config.svm.features}) on {len(rows):,} of "
        f"{num_train:,} {train_split} examples.", flush=True)
  train_features, y_train = read_features(config, pp, train_split, rows,
                                          target, vocabularies)
  scalers = {m: fit_standardizer(x) for m, x in train_features.items()}
  x_train = views(standardize(train_features, scalers), config.svm.features)
  del train_features

  def split_views(split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    features, labels = read_features(config, pp, split, None, target,
                                     vocabularies)
    return views(standardize(features, scalers), config.svm.features), labels

  x_val, y_val = split_views(VALIDATION)
  fits = [fit_view(name, x_train[name], y_train, x_val[name], y_val,
                   config.svm, svc_class) for name in x_train]
  del x_val

  classes = fits[0].svc.classes_
  labels = decide([f.validation_scores for f in fits], classes)
  accuracies = {VALIDATION: float(np.mean(labels == y_val))}
  for split in config.dataset.eval_splits:
    if split not in accuracies:
      x_split, y_split = split_views(split)
      labels = decide([view_scores(f, x_train[f.name], x_split[f.name])
                       for f in fits], classes)
      accuracies[split] = float(np.mean(labels == y_split))
  results = results_of(fits, accuracies, x_train, config.svm.features,
                       num_train)
  train.write_json(os.path.join(workdir, "results.json"), results)
  print(_summary(results), flush=True)
  return results


def check_svm_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first problem of ``config.svm``."""
  svm = config.svm
  if svm.features not in FEATURES:
    raise ValueError(f"Unknown config.svm.features {svm.features!r}. Valid: "
                     f"{', '.join(FEATURES)}.")
  if svm.max_train_examples < 2:
    raise ValueError("config.svm.max_train_examples must be at least 2; got "
                     f"{svm.max_train_examples}.")
  for field in ("C", "gamma_factors"):
    grid = tuple(svm[field])
    if not grid or min(grid) <= 0:
      raise ValueError(f"config.svm.{field} must be a non-empty tuple of "
                       f"positive numbers; got {grid}.")
  if jax.process_count() > 1:
    raise ValueError("The SVM baseline runs in one process; got "
                     f"{jax.process_count()}.")


def _import_svc() -> type:
  try:
    from sklearn import svm as sklearn_svm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The SVM baseline (config.svm) needs scikit-learn: "
                      "pip install -e '.[svm]'.") from e
  return sklearn_svm.SVC


def classification_target(config: ml_collections.ConfigDict,
                          builder: tfds.core.DatasetBuilder) -> str:
  """The label field of the config's one head, which must be a class label
  of the dataset (``tfds.features.ClassLabel``) with a validation split."""
  heads = config.model.heads
  if len(heads) != 1:
    raise ValueError("The SVM baseline fits one classifier, for one head; "
                     f"config.model.heads has {len(heads)}: "
                     f"{', '.join(heads)}.")
  (name, head), = heads.items()
  features = builder.info.features
  if (head.target not in features or
      not isinstance(features[head.target], tfds.features.ClassLabel)):
    raise ValueError(
        f"config.model.heads.{name}.target={head.target!r} is not a "
        f"classification label of {pipeline.dataset_name(config.dataset)} (a "
        "ClassLabel feature); the SVM baseline only classifies.")
  if VALIDATION not in builder.info.splits:
    raise ValueError(f"The SVM baseline chooses C and gamma on the "
                     f"{VALIDATION!r} split, which "
                     f"{pipeline.dataset_name(config.dataset)} lacks.")
  return head.target


def subsample(num_examples: int, max_examples: int, seed: int) -> np.ndarray:
  """Sorted indices of ``min(num_examples, max_examples)`` distinct
  examples, drawn with ``seed`` (all of them, in order, if fewer)."""
  if num_examples <= max_examples:
    return np.arange(num_examples)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, max_examples, replace=False))


def read_features(config: ml_collections.ConfigDict, pp: preprocess.Op,
                  split: str, rows: np.ndarray | None, target: str,
                  vocabularies: dict[str, Vocabulary]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Examples ``rows`` of ``split`` (``None``: all), through ``pp``
  (``config.input.pp_eval``'s function): ``({modality: [examples,
  features]}, labels [examples])`` (see ``modality_features``)."""
  source = pipeline.data_source(config.dataset, config.input, split)
  rows = np.arange(len(source)) if rows is None else rows
  vocab_sizes = {k: v.size for k, v in vocabularies.items()}
  chunks, labels = [], []
  for start in range(0, len(rows), _READ_CHUNK):
    batch = pp(pipeline.read_batch(source, rows[start:start + _READ_CHUNK]),
               np.random.default_rng(0))
    chunks.append(modality_features(batch, config.model.modalities,
                                    vocab_sizes))
    labels.append(batch[target])
  features = {m: np.concatenate([c[m] for c in chunks])
              for m in config.model.modalities}
  return features, np.concatenate(labels)


def modality_features(batch: dict[str, np.ndarray],
                      modalities: tuple[str, ...],
                      vocab_sizes: dict[str, int]) -> dict[str, np.ndarray]:
  """A preprocessed batch -> ``{modality: [batch, features]}`` float32:
  bag-of-words counts for the tokenized fields (``vocab_sizes``' keys),
  the flattened array for the others."""
  features = {}
  for m in modalities:
    if m in vocab_sizes:
      features[m] = bag_of_words(batch[m], vocab_sizes[m])
    else:
      features[m] = batch[m].reshape(len(batch[m]), -1).astype(np.float32)
  return features


def bag_of_words(ids_BxL: np.ndarray, vocab_size: int) -> np.ndarray:
  """Token ids ``[batch, length]`` -> counts ``[batch, vocab_size - 1]``
  float32: column ``j`` counts id ``j + 1`` (padding, id 0, is not a word)."""
  counts = np.zeros((len(ids_BxL), vocab_size), np.float32)
  np.add.at(counts, (np.arange(len(ids_BxL))[:, None], ids_BxL), 1)
  return counts[:, Vocabulary.pad_id + 1:]


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """Per-column statistics ``[features]`` of the train subsample."""
  mean: np.ndarray
  std: np.ndarray  # 1 where the train column is constant.


def fit_standardizer(x_NxF: np.ndarray) -> Standardizer:
  std = x_NxF.std(axis=0)
  return Standardizer(mean=x_NxF.mean(axis=0),
                      std=np.where(std > 0, std, 1).astype(np.float32))


def standardize(features: dict[str, np.ndarray],
                scalers: dict[str, Standardizer]) -> dict[str, np.ndarray]:
  """``(x - mean) / std`` of each modality, with its train statistics."""
  return {m: (x - scalers[m].mean) / scalers[m].std
          for m, x in features.items()}


def views(features: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
  """The inputs of each SVM, ``{name: [examples, features]}``: one view of
  every modality concatenated (named ``"image+question"``) for ``"concat"``,
  one view per modality for ``"per_modality"``."""
  if mode == "per_modality":
    return dict(features)
  return {"+".join(features): np.concatenate(list(features.values()), axis=1)}


def squared_distances(x_NxF: np.ndarray, y_MxF: np.ndarray) -> np.ndarray:
  """``|x_i - y_j|^2``, ``[N, M]`` float32, by matrix product."""
  x_norms = np.einsum("nf,nf->n", x_NxF, x_NxF, dtype=np.float64)
  y_norms = np.einsum("mf,mf->m", y_MxF, y_MxF, dtype=np.float64)
  cross = x_NxF @ y_MxF.T
  return np.maximum(x_norms[:, None] + y_norms[None] - 2 * cross,
                    0).astype(np.float32)


def scale_gamma(x_NxF: np.ndarray) -> float:
  """scikit-learn's ``gamma="scale"``: ``1 / (features * x.var())``."""
  return 1.0 / (x_NxF.shape[1] * float(x_NxF.var()))


def rbf_kernel(distances: np.ndarray, gamma: float) -> np.ndarray:
  """``exp(-gamma * distances)``, float64 as libsvm reads it."""
  return np.exp(-gamma * distances.astype(np.float64))


def class_scores(svc: Any, kernel_NxT: np.ndarray) -> np.ndarray:
  """One-vs-rest decision values ``[N, classes]`` (of ``svc.classes_``)
  from the kernel between ``N`` examples and the ``T`` train examples."""
  scores = svc.decision_function(kernel_NxT)
  if scores.ndim == 1:  # Two classes: one value, positive for classes_[1].
    scores = np.stack([-scores, scores], axis=1)
  return scores


def best_grid_point(grid: list[dict[str, Any]]) -> int:
  """The index of the highest ``validation_accuracy``; the first on ties."""
  return int(np.argmax([point["validation_accuracy"] for point in grid]))


@dataclasses.dataclass(frozen=True)
class ViewFit:
  """An SVM fit on one view, with the hyper-parameters best on validation.

  Attributes:
    name: the view (``views``).
    svc: the fitted ``SVC(kernel="precomputed")``.
    gamma: its RBF kernel's ``gamma``.
    grid: every grid point: ``C``, ``gamma_factor``, ``gamma``,
      ``validation_accuracy``, ``fit_seconds``, ``num_support``.
    chosen: the index of ``svc``'s point in ``grid``.
    validation_scores: ``svc``'s ``class_scores`` of the validation split.
    train_seconds: the chosen point's train kernel (distances and ``exp``)
      and fit.
    search_seconds: the whole grid search, validation kernels included.
  """
  name: str
  svc: Any
  gamma: float
  grid: list[dict[str, Any]]
  chosen: int
  validation_scores: np.ndarray
  train_seconds: float
  search_seconds: float


def fit_view(name: str, x_train: np.ndarray, y_train: np.ndarray,
             x_val: np.ndarray, y_val: np.ndarray,
             svm_config: ml_collections.ConfigDict, svc_class: type) -> ViewFit:
  """Fits ``svc_class`` (``SVC``) on ``x_train`` ``[N, F]`` at every point of
  ``C x gamma_factors``; keeps the most accurate on ``x_val`` ``[V, F]``."""
  start = time.perf_counter()
  distances_train = squared_distances(x_train, x_train)
  distance_seconds = time.perf_counter() - start
  distances_val = squared_distances(x_val, x_train)
  base_gamma = scale_gamma(x_train)
  grid, best = [], None  # best: the chosen point's SVC and scores so far.
  for c in svm_config.C:
    for factor in svm_config.gamma_factors:
      gamma = factor * base_gamma
      fit_start = time.perf_counter()
      svc = svc_class(kernel="precomputed", C=c)
      svc.fit(rbf_kernel(distances_train, gamma), y_train)
      fit_seconds = time.perf_counter() - fit_start
      scores = class_scores(svc, rbf_kernel(distances_val, gamma))
      accuracy = float(np.mean(decide([scores], svc.classes_) == y_val))
      grid.append(dict(C=c, gamma_factor=factor, gamma=gamma,
                       validation_accuracy=accuracy, fit_seconds=fit_seconds,
                       num_support=int(svc.n_support_.sum())))
      print(f"  SVM {name}: C={c:g} gamma={factor:g}*scale: validation "
            f"accuracy {accuracy:.4f} ({fit_seconds:.1f} s fit, "
            f"{grid[-1]['num_support']:,} support vectors)", flush=True)
      if best_grid_point(grid) == len(grid) - 1:
        best = (svc, scores)
  chosen = best_grid_point(grid)
  svc, scores = best
  return ViewFit(name=name, svc=svc, gamma=grid[chosen]["gamma"], grid=grid,
                 chosen=chosen, validation_scores=scores,
                 train_seconds=distance_seconds + grid[chosen]["fit_seconds"],
                 search_seconds=time.perf_counter() - start)


def view_scores(fit: ViewFit, x_train: np.ndarray,
                x: np.ndarray) -> np.ndarray:
  """``fit``'s decision values ``[examples, classes]`` of its view ``x``
  ``[examples, features]`` (``x_train``: the view it was fit on)."""
  return class_scores(fit.svc, rbf_kernel(squared_distances(x, x_train),
                                          fit.gamma))


def decide(scores: list[np.ndarray], classes: np.ndarray) -> np.ndarray:
  """Labels ``[examples]``: the class of the highest decision value,
  averaged over the SVMs' ``scores`` (one for "concat")."""
  return classes[np.mean(scores, axis=0).argmax(1)]


def num_params(fits: list[ViewFit], x_train: dict[str, np.ndarray]) -> int:
  """The numbers the fitted baseline decides with: for each SVM, its
  support vectors (``support x features``), their dual coefficients
  (``support x (classes - 1)``) and the one-vs-one intercepts
  (``classes * (classes - 1) / 2``); plus the standardisation's mean and
  standard deviation of every feature."""
  total = 0
  for fit in fits:
    features = x_train[fit.name].shape[1]
    total += (fit.svc.n_support_.sum() * features + fit.svc.dual_coef_.size +
              fit.svc.intercept_.size + 2 * features)
  return int(total)


def results_of(fits: list[ViewFit], accuracies: dict[str, float],
               x_train: dict[str, np.ndarray], mode: str,
               num_train: int) -> dict[str, Any]:
  """The contents of ``results.json`` (module docstring)."""
  train_examples = len(next(iter(x_train.values())))
  train_seconds = sum(f.train_seconds for f in fits)
  per_view = {}
  for fit in fits:
    chosen = fit.grid[fit.chosen]
    per_view[fit.name] = dict(
        C=chosen["C"], gamma=fit.gamma, gamma_factor=chosen["gamma_factor"],
        features=x_train[fit.name].shape[1],
        num_support=[int(n) for n in fit.svc.n_support_],
        train_seconds=fit.train_seconds, grid=fit.grid)
  results: dict[str, Any] = {split: {"accuracy": accuracy}
                             for split, accuracy in accuracies.items()}
  results.update(
      num_params=num_params(fits, x_train), train_seconds=train_seconds,
      examples_per_sec=train_examples / max(train_seconds, 1e-9),
      grid_search_seconds=sum(f.search_seconds for f in fits),
      svm=dict(features=mode, train_examples=train_examples,
               train_split_examples=num_train, views=per_view))
  return results


def _summary(results: dict[str, Any]) -> str:
  lines = [f"Done: SVM on {results['svm']['train_examples']:,} examples, "
           f"{results['train_seconds']:.1f} s training (grid search "
           f"{results['grid_search_seconds']:.1f} s), "
           f"{results['num_params']:,} parameters."]
  for name, view in results["svm"]["views"].items():
    lines.append(f"  {name}: C={view['C']:g}, gamma={view['gamma']:.3g} "
                 f"({view['gamma_factor']:g}*scale), "
                 f"{sum(view['num_support']):,} support vectors")
  for split in (VALIDATION, "test"):
    if split in results:
      lines.append(f"  {split}: accuracy {results[split]['accuracy']:.4f}")
  return "\n".join(lines)
