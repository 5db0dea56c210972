"""Losses and per-example metrics of the heads, and how several heads' losses
are weighted into one.

A head's ``loss`` (``config.model.heads.<head>.loss``, default
"softmax_xent") says what its outputs are, what its labels
(``batch[<head>.target]``) must be and which metric it reports:

=============  ========================  =========================  ========
loss           outputs                   labels                     metric
=============  ========================  =========================  ========
softmax_xent   logits [batch, classes]   int [batch]                accuracy
sigmoid_xent   logits [batch, classes]   0/1 [batch, classes]       accuracy
mse            values [batch, 1]         numbers [batch]            mae
l1             values [batch, 1]         numbers [batch]            mae
=============  ========================  =========================  ========

* ``softmax_xent``: softmax cross-entropy; accuracy of the argmax.
* ``sigmoid_xent`` (multi-label): binary cross-entropy of each label, summed
  over the labels (as big_vision's ``sigmoid_xent``); its accuracy is the
  fraction of labels predicted right, each thresholded at probability 0.5
  (logit 0), i.e. one minus the Hamming loss.
* ``mse`` and ``l1``: squared and absolute error of a regression head, whose
  outputs are ``[batch, 1]`` (``build_model`` gives it one output) or
  ``[batch]``; both report ``mae``, the mean absolute error. (The RMSE is not
  a mean over examples, which the eval sums are; an ``mse`` head's
  ``loss/<head>`` is the MSE.)

Several heads (multi-task learning): the total loss is, with
``config.model.loss_weighting``,

* ``"fixed"`` (default): ``sum_i w_i L_i``, ``w_i`` the head's ``weight``
  (default 1);
* ``"uncertainty"``: ``sum_i exp(-s_i) L_i + s_i``, with ``s_i = log
  sigma_i^2`` a learned parameter per head (``LogVariances``, initialised to
  0: unit weights), after Kendall, Gal & Cipolla 2018, "Multi-Task Learning
  Using Uncertainty to Weigh Losses for Scene Geometry and Semantics"
  (arXiv:1705.07115), who also learn ``s = log sigma^2`` rather than
  ``sigma``. The paper derives a different term per likelihood: ``1 / (2
  sigma^2) L + log sigma`` for a Gaussian (regression, ``L`` the squared
  error) and ``1 / sigma^2 L + log sigma`` for a softmax with temperature
  (classification, approximated), i.e. ``(exp(-s) L + s) / 2`` and ``exp(-s)
  L + s / 2``. mmjax's choice, not the paper's: one form for every loss type,
  ``exp(-s_i) L_i + s_i`` (twice the paper's regression term; for
  classification it regularises ``s`` twice as strongly). Its optimum is
  ``s_i = log L_i``: each loss gets weight ``1 / L_i``. The heads' ``weight``
  must then be 1 (``validate_config``): the weights are learned.

What a head step reports (``head_terms``), per example: ``loss`` (the total),
``accuracy`` (of the first head, which must therefore be a classification
head: the run's accuracy, as with one head) and, with several heads,
``loss/<head>`` (unweighted) and ``<metric>/<head>`` for each head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

# Where uncertainty weighting's log-variances live in the model's params.
LOG_VARIANCES = "loss_weighting"
WEIGHTINGS = ("fixed", "uncertainty")
DEFAULT_LOSS = "softmax_xent"
# Metrics (before the "/<head>") for which lower is better.
LOWER_IS_BETTER = ("loss", "mae")


class Task(NamedTuple):
  """What one head learns.

  Attributes:
    target: the batch key of its labels.
    weight: its loss's weight (fixed weighting).
    loss: a name in ``LOSSES``.
  """
  target: str
  weight: float = 1.0
  loss: str = DEFAULT_LOSS


def head_targets(heads: ml_collections.ConfigDict) -> dict[str, Task]:
  """head name -> its ``Task``, from ``config.model.heads``."""
  return {name: Task(head.target, float(head.get("weight", 1.0)),
                     head.get("loss", DEFAULT_LOSS))
          for name, head in heads.items()}


def softmax_xent(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Softmax cross-entropy, ``[batch]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)


def sigmoid_xent(logits_BxC: jax.Array, labels_BxC: jax.Array) -> jax.Array:
  """Binary cross-entropy of every label, summed over labels: ``[batch]``."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BxC, labels_BxC),
                 axis=-1)


def squared_error(values_B: jax.Array, targets_B: jax.Array) -> jax.Array:
  return jnp.square(values_B - targets_B)


def absolute_error(values_B: jax.Array, targets_B: jax.Array) -> jax.Array:
  return jnp.abs(values_B - targets_B)


def argmax_accuracy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """1.0 where the largest logit is the label's, ``[batch]``."""
  return (jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32)


def label_accuracy(logits_BxC: jax.Array, labels_BxC: jax.Array) -> jax.Array:
  """The fraction of labels predicted right (logit > 0 for a 1), ``[batch]``."""
  return jnp.mean(((logits_BxC > 0) == (labels_BxC > 0.5)).astype(jnp.float32),
                  axis=-1)


class LossType(NamedTuple):
  """One entry of ``LOSSES``.

  Attributes:
    per_example: ``(outputs, labels) -> [batch]`` loss.
    metric: the name of the head's metric.
    metric_fn: ``(outputs, labels) -> [batch]`` metric.
    predict: outputs -> what ``mmjax.evaluate.load`` predicts.
    regression: whether outputs are values (``[batch]`` after
      ``_loss_inputs``) and labels numbers.
  """
  per_example: Callable[[jax.Array, jax.Array], jax.Array]
  metric: str
  metric_fn: Callable[[jax.Array, jax.Array], jax.Array]
  predict: Callable[[jax.Array], jax.Array]
  regression: bool = False


LOSSES = {
    "softmax_xent": LossType(softmax_xent, "accuracy", argmax_accuracy,
                             lambda x: jax.nn.softmax(x, axis=-1)),
    "sigmoid_xent": LossType(sigmoid_xent, "accuracy", label_accuracy,
                             jax.nn.sigmoid),
    "mse": LossType(squared_error, "mae", absolute_error, lambda x: x,
                    regression=True),
    "l1": LossType(absolute_error, "mae", absolute_error, lambda x: x,
                   regression=True),
}


def _loss_inputs(name: str, task: Task, outputs: jax.Array,
                 labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A head's outputs and labels as its loss reads them: a regression head's
  ``[batch, 1]`` outputs become ``[batch]``, its labels float32, multi-label
  labels float32 ``[batch, classes]``; raises on any other shape."""
  kind = LOSSES[task.loss]
  if kind.regression:
    if outputs.ndim == 2 and outputs.shape[-1] == 1:
      outputs = outputs[:, 0]
    if outputs.ndim != 1 or labels.shape != outputs.shape:
      raise ValueError(
          f"Head {name!r} ({task.loss}) needs outputs of shape [batch] or "
          f"[batch, 1] and labels ({task.target!r}) of shape [batch]; got "
          f"{outputs.shape} and {labels.shape}.")
    return outputs, labels.astype(jnp.float32)
  if task.loss == "sigmoid_xent":
    if labels.shape != outputs.shape:
      raise ValueError(
          f"Head {name!r} (sigmoid_xent) needs labels ({task.target!r}) of "
          f"its logits' shape [batch, classes] {outputs.shape}; got "
          f"{labels.shape}.")
    return outputs, labels.astype(jnp.float32)
  return outputs, labels


def head_terms(outputs: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], tasks: Mapping[str, Task],
               log_variances: Mapping[str, jax.Array] | None = None
               ) -> dict[str, jax.Array]:
  """Per-example losses and metrics, ``[batch]`` each (see the module
  docstring): ``accuracy`` of the first head, the total ``loss`` and, with
  several heads, ``loss/<head>`` and ``<metric>/<head>``.

  Args:
    outputs: head -> its outputs (``MultimodalModel``'s).
    batch: holds each task's ``target``.
    tasks: head -> ``Task`` (``head_targets``), in the heads' order.
    log_variances: head -> ``s_i`` scalar for uncertainty weighting
      (``params[LOG_VARIANCES]``); ``None``: fixed weights.
  """
  first = next(iter(tasks.values()))
  if LOSSES[first.loss].metric != "accuracy":
    raise ValueError(f"The first head is the run's accuracy: it needs a "
                     f"classification loss, not {first.loss!r}.")
  terms, per_head = {}, {}
  for i, (name, task) in enumerate(tasks.items()):
    kind = LOSSES[task.loss]
    x, labels = _loss_inputs(name, task, outputs[name], batch[task.target])
    per_head[name] = kind.per_example(x, labels)
    metric = kind.metric_fn(x, labels)
    if i == 0:
      terms["accuracy"] = metric
    if len(tasks) > 1:
      terms[f"loss/{name}"] = per_head[name]
      terms[f"{kind.metric}/{name}"] = metric
  terms["loss"] = total_loss(per_head, tasks, log_variances)
  return terms


@dataclasses.dataclass(frozen=True)
class Supervised:
  """The heads' objective, for ``steps.train_step``: ``head_terms`` of the
  model's outputs, with the learned log-variances of uncertainty weighting
  when the params hold them. (``mmjax.contrastive.Objective`` is the
  two-tower one.)"""
  tasks: Mapping[str, Task]

  def __call__(self, outputs: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], params: Mapping[str, Any],
               axis_name: str | None) -> dict[str, jax.Array]:
    del axis_name  # Per-example terms: nothing to gather.
    return head_terms(outputs, batch, self.tasks, params.get(LOG_VARIANCES))


def total_loss(per_head: Mapping[str, jax.Array], tasks: Mapping[str, Task],
               log_variances: Mapping[str, jax.Array] | None = None
               ) -> jax.Array:
  """``[batch]`` total of the heads' ``[batch]`` losses: ``sum_i w_i L_i``,
  or ``sum_i exp(-s_i) L_i + s_i`` given ``log_variances`` (see the module
  docstring)."""
  total = 0.0
  for name, loss in per_head.items():
    if log_variances is None:
      total = total + tasks[name].weight * loss
    else:
      s = log_variances[name]
      total = total + jnp.exp(-s) * loss + s
  return total


def learned_weights(log_variances: Mapping[str, jax.Array]
                    ) -> dict[str, jax.Array]:
  """``loss_weight/<head>``: ``exp(-s_i)``, the weight uncertainty weighting
  gives head ``i``'s loss (logged with the train metrics)."""
  return {f"loss_weight/{name}": jnp.exp(-s)
          for name, s in log_variances.items()}


def metric_names(tasks: Mapping[str, Task]) -> list[str]:
  """The metrics ``head_terms`` returns for ``tasks``, as evaluation logs
  them."""
  names = ["accuracy", "loss"]
  if len(tasks) > 1:
    for name, task in tasks.items():
      names += [f"loss/{name}", f"{LOSSES[task.loss].metric}/{name}"]
  return names


def predictions(outputs: Mapping[str, jax.Array],
                tasks: Mapping[str, Task]) -> dict[str, jax.Array]:
  """head -> what it predicts: softmax probabilities ``[batch, classes]``,
  each label's probability ``[batch, classes]`` (sigmoid_xent), or the
  regressed values ``[batch, 1]``."""
  return {name: LOSSES[tasks[name].loss].predict(x)
          for name, x in outputs.items()}


class LogVariances(nn.Module):
  """Uncertainty weighting's learned ``s_i = log sigma_i^2``: one float32
  scalar parameter per head, initialised to 0 (unit weights).
  ``MultimodalModel`` declares it as ``params[LOG_VARIANCES]``, so that the
  optimizer trains it and checkpoints hold it; the loss reads it there.

  Attributes:
    heads: the head names.
  """
  heads: tuple[str, ...]

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    """-> head -> ``s_i`` scalar."""
    return {name: self.param(name, nn.initializers.zeros, (), jnp.float32)
            for name in self.heads}
