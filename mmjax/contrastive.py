"""Two-tower contrastive alignment: the CLIP and SigLIP losses, and retrieval
metrics.

Each loss takes one device's image and text embeddings (``[batch, dim]``,
pair ``i`` of the batch being image ``i`` and text ``i``) and, under data
parallelism, the name of the device axis: the loss is then over the *global*
batch, every image against every text of every device, as if one device held
the whole batch. Per device the value is the global loss, so that the mean of
the devices' gradients (``lax.pmean``, as ``steps.train_step`` takes it) is
the gradient of the global loss (``tests/test_contrastive.py`` checks both
against one device on 4 simulated devices).

* CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
  Natural Language Supervision", arXiv:2103.00020, Figure 3): L2-normalised
  embeddings, logits ``z_img @ z_txt^T * exp(t)`` with a learned log-scale
  ``t`` (initialised at ``log(1 / 0.07)``), and the mean of the softmax
  cross-entropies over texts (each image's row) and over images (each text's
  column).
* SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
  arXiv:2303.15343, Algorithm 1): logits ``z_img @ z_txt^T * exp(t) + b``
  (``t`` initialised at ``log 10``, ``b`` at -10), label +1 on the diagonal
  and -1 elsewhere, ``-sum(log sigmoid(label * logit)) / batch``. With
  ``chunked=True``, the paper's efficient form (its Section 3.3): each device
  scores its images against its own texts, then against the texts of each
  other device in turn, passed around the ring of devices
  (``lax.ppermute``), so no device holds more than two blocks of texts; the
  gathered form holds them all.

Repeated texts (``text_keys``): both papers train on web pairs, where two
captions of a batch are practically never the same, and count every pair but
the diagonal as a negative. Where texts repeat (half the examples of a batch
of 128 from ``mm_shapes/simple`` share their caption with another), that
would push apart an image and its own caption. Given ``text_keys`` (e.g. the
texts' token ids), every pair whose keys are equal is a positive: SigLIP
labels it +1, and CLIP's cross-entropy spreads each row's (column's) target
evenly over its positives, as UniCL does for pairs that share a label (Yang
et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space",
arXiv:2204.03610). Without keys, only the diagonal is positive, as in the
papers. This option is mmjax's, for datasets with repeated texts. For CLIP
it changes nothing when equal texts get equal embeddings (a text tower
without dropout): each image's logits to the copies of its text are then
equal, so the spread target gives each row the same cross-entropy, and each
text's column terms, spread or not, sum to the same total over the copies
(``tests/test_contrastive.py`` checks it). SigLIP, which scores each pair on
its own, labels the copies -1 without keys and +1 with them.

Retrieval: ``recall_at_k`` and ``zero_shot_accuracy`` score similarity
matrices on the host; ``retrieval_metrics`` computes a split's metrics from
its embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CLIP_LOG_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOG_SCALE_INIT = math.log(10.0)
SIGLIP_BIAS_INIT = -10.0
LOSS_NAMES = ("clip", "siglip")
# "same_text": pairs with identical texts are positives; "pair": only the
# pair itself (the papers).
POSITIVES = ("same_text", "pair")
# The parameter group of the learned log-scale and bias.
LOGIT_SCALE = "logit_scale"
# What split_metrics reports (accuracy/zero_shot only with prompts).
METRIC_NAMES = ("loss", "accuracy/zero_shot", "recall@1/image_to_text",
                "recall@5/image_to_text", "recall@1/text_to_image",
                "recall@5/text_to_image")
# Keys of the embedding step's outputs besides the modalities'.
TEXT_KEYS, LOG_SCALE, BIAS = "_text_keys", "_log_scale", "_bias"


def l2_normalize(x_BxD: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Each row divided by its L2 norm (rows of zeros stay zero)."""
  norm_Bx1 = jnp.linalg.norm(x_BxD, axis=-1, keepdims=True)
  return x_BxD / jnp.maximum(norm_Bx1, eps)


def gather_batch(x_BxD: jax.Array, axis_name: str | None) -> jax.Array:
  """Every device's ``[batch, dim]`` rows stacked in device order:
  ``[devices * batch, dim]`` (``x`` itself without an axis)."""
  if axis_name is None:
    return x_BxD
  return jax.lax.all_gather(x_BxD, axis_name, tiled=True)


def positives(rows: int, columns: int, *, diagonal: bool,
              row_keys_RxK: jax.Array | None = None,
              column_keys_CxK: jax.Array | None = None) -> jax.Array:
  """``[rows, columns]`` bool: which pairs are positives. Pair ``(i, j)`` is
  one where ``row_keys[i]`` equals ``column_keys[j]`` (every entry of the
  key rows), or, without keys, where ``i == j`` in a ``diagonal`` block."""
  if row_keys_RxK is None:
    return jnp.eye(rows, columns, dtype=bool) if diagonal else jnp.zeros(
        (rows, columns), bool)
  return jnp.all(row_keys_RxK[:, None] == column_keys_CxK[None, :], axis=-1)


def clip_loss(image_BxD: jax.Array, text_BxD: jax.Array,
              log_scale: jax.Array, *, axis_name: str | None = None,
              text_keys_BxK: jax.Array | None = None) -> jax.Array:
  """CLIP's symmetric softmax loss over the global batch (module docstring).

  Args:
    image_BxD, text_BxD: this device's embeddings of its pairs (normalised
      here).
    log_scale: the learned log of the logits' scale, a scalar.
    axis_name: the data-parallel axis, or None on one device.
    text_keys_BxK: optional keys of the texts (e.g. token ids); pairs with
      equal keys are positives (module docstring). None: the diagonal only.

  Returns:
    The global batch's loss, a scalar (the same on every device).
  """
  image_NxD = gather_batch(l2_normalize(image_BxD), axis_name)
  text_NxD = gather_batch(l2_normalize(text_BxD), axis_name)
  logits_NxN = image_NxD @ text_NxD.T * jnp.exp(log_scale)
  n = logits_NxN.shape[0]
  if text_keys_BxK is None:
    target_logits_N = target_logits_T = jnp.diagonal(logits_NxN)
  else:
    keys_NxK = gather_batch(text_keys_BxK, axis_name)
    positive_NxN = positives(n, n, diagonal=True, row_keys_RxK=keys_NxK,
                             column_keys_CxK=keys_NxK).astype(logits_NxN.dtype)
    # The cross-entropy with the target spread evenly over the positives.
    positive_logits_NxN = positive_NxN * logits_NxN
    target_logits_N = positive_logits_NxN.sum(1) / positive_NxN.sum(1)
    target_logits_T = positive_logits_NxN.sum(0) / positive_NxN.sum(0)
  image_to_text = jax.nn.logsumexp(logits_NxN, axis=1) - target_logits_N
  text_to_image = jax.nn.logsumexp(logits_NxN, axis=0) - target_logits_T
  return (image_to_text.mean() + text_to_image.mean()) / 2


def _sigmoid_pair_terms(image_BxD: jax.Array, text_BxD: jax.Array,
                        log_scale: jax.Array, bias: jax.Array,
                        positive_BxB: jax.Array) -> jax.Array:
  """``sum log sigmoid(label * logit)`` over the block's pairs, with label +1
  where ``positive`` and -1 elsewhere."""
  logits_BxB = image_BxD @ text_BxD.T * jnp.exp(log_scale) + bias
  labels_BxB = jnp.where(positive_BxB, 1.0, -1.0).astype(logits_BxB.dtype)
  return jnp.sum(jax.nn.log_sigmoid(labels_BxB * logits_BxB))


def siglip_loss(image_BxD: jax.Array, text_BxD: jax.Array,
                log_scale: jax.Array, bias: jax.Array, *,
                axis_name: str | None = None, chunked: bool = False,
                text_keys_BxK: jax.Array | None = None) -> jax.Array:
  """SigLIP's sigmoid loss over the global batch (module docstring).

  Args:
    image_BxD, text_BxD: this device's embeddings of its pairs (normalised
      here).
    log_scale, bias: the learned log-scale and bias, scalars.
    axis_name: the data-parallel axis, or None on one device.
    chunked: pass the texts around the ring of devices instead of gathering
      them (the same value; less memory with many devices).
    text_keys_BxK: optional keys of the texts; pairs with equal keys are
      positives (module docstring). None: the diagonal only.

  Returns:
    ``-sum over all global pairs of log sigmoid(label * logit) / global
    batch``, a scalar (the same on every device).
  """
  image_BxD, text_BxD = l2_normalize(image_BxD), l2_normalize(text_BxD)
  keys_BxK = text_keys_BxK
  if axis_name is None or not chunked:
    image_NxD = gather_batch(image_BxD, axis_name)
    text_NxD = gather_batch(text_BxD, axis_name)
    n = image_NxD.shape[0]
    if keys_BxK is not None:
      keys_BxK = gather_batch(keys_BxK, axis_name)
    positive_NxN = positives(n, n, diagonal=True, row_keys_RxK=keys_BxK,
                             column_keys_CxK=keys_BxK)
    return -_sigmoid_pair_terms(image_NxD, text_NxD, log_scale, bias,
                                positive_NxN) / n
  devices = jax.lax.axis_size(axis_name)
  b = image_BxD.shape[0]
  total = _sigmoid_pair_terms(
      image_BxD, text_BxD, log_scale, bias,
      positives(b, b, diagonal=True, row_keys_RxK=keys_BxK,
                column_keys_CxK=keys_BxK))
  ring = [(i, (i + 1) % devices) for i in range(devices)]
  other_keys_BxK = keys_BxK
  for _ in range(devices - 1):
    text_BxD = jax.lax.ppermute(text_BxD, axis_name, ring)
    if keys_BxK is not None:
      other_keys_BxK = jax.lax.ppermute(other_keys_BxK, axis_name, ring)
    total = total + _sigmoid_pair_terms(
        image_BxD, text_BxD, log_scale, bias,
        positives(b, b, diagonal=False, row_keys_RxK=keys_BxK,
                  column_keys_CxK=other_keys_BxK))
  global_batch = devices * image_BxD.shape[0]
  return -jax.lax.psum(total, axis_name) / global_batch


def recall_at_k(similarity_QxC: np.ndarray, k: int,
                positives_QxC: np.ndarray | None = None) -> float:
  """The fraction of queries (rows) whose best-scored positive candidate
  (column) is among their ``k`` most similar: fewer than ``k`` negatives
  score at least as high as it (a tie with a negative counts against it, so
  a model that scores everything alike does not retrieve).

  ``positives`` defaults to the identity (query ``i`` matches candidate
  ``i``); image-to-text recall is ``recall_at_k(sim, k)``, text-to-image
  ``recall_at_k(sim.T, k)``.
  """
  similarity_QxC = np.asarray(similarity_QxC, np.float64)
  if positives_QxC is None:
    if similarity_QxC.shape[0] != similarity_QxC.shape[1]:
      raise ValueError(f"recall_at_k: a {similarity_QxC.shape} similarity "
                       "matrix needs positives (the identity pairs only a "
                       "square one).")
    positives_QxC = np.eye(similarity_QxC.shape[0], dtype=bool)
  if k < 1:
    raise ValueError(f"recall_at_k: k must be at least 1; got {k}.")
  best_positive_Q = np.where(positives_QxC, similarity_QxC, -np.inf).max(1)
  negatives_above_Q = np.sum(
      ~positives_QxC & (similarity_QxC >= best_positive_Q[:, None]), axis=1)
  has_positive_Q = positives_QxC.any(axis=1)
  return float(np.mean(has_positive_Q & (negatives_above_Q < k)))


def zero_shot_accuracy(image_NxD: np.ndarray, prompts_CxD: np.ndarray,
                       labels_N: np.ndarray) -> float:
  """Zero-shot classification: each image is given the class whose prompt
  embedding is most similar (cosine); returns the accuracy against
  ``labels``."""
  image_NxD = np.asarray(l2_normalize(jnp.asarray(image_NxD)))
  prompts_CxD = np.asarray(l2_normalize(jnp.asarray(prompts_CxD)))
  predicted_N = np.argmax(image_NxD @ prompts_CxD.T, axis=1)
  return float(np.mean(predicted_N == np.asarray(labels_N)))


class LogitScale(nn.Module):
  """The learned log-scale of the logits, and SigLIP's bias: ``(log_scale,
  bias)`` scalars (``bias`` None for CLIP), initialised as the papers do."""
  loss: str

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    siglip = self.loss == "siglip"
    log_scale = self.param(
        "log_scale", nn.initializers.constant(
            SIGLIP_LOG_SCALE_INIT if siglip else CLIP_LOG_SCALE_INIT), ())
    bias = self.param("bias", nn.initializers.constant(SIGLIP_BIAS_INIT),
                      ()) if siglip else None
    return log_scale, bias


@dataclasses.dataclass(frozen=True)
class Objective:
  """The two-tower training objective, for ``steps.train_step``.

  Attributes:
    loss: "clip" or "siglip".
    modalities: ``(image side, text side)``: the model's two outputs, in the
      order of ``image_to_text`` metrics; the text side's inputs are the
      ``text_keys``.
    positives: ``POSITIVES``: "same_text" makes pairs with identical text
      inputs positives (module docstring), "pair" only each pair itself.
    chunked: SigLIP's ring of devices instead of gathering the texts.
  """
  loss: str
  modalities: tuple[str, str]
  positives: str = "same_text"
  chunked: bool = False

  def text_keys(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    """``[batch, K]``: the text side's inputs, flattened, or None with
    ``positives="pair"``."""
    if self.positives == "pair":
      return None
    text = batch[self.modalities[1]]
    return text.reshape(text.shape[0], -1)

  def __call__(self, embeddings: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], params: Mapping[str, Any],
               axis_name: str | None) -> dict[str, jax.Array]:
    """Scalars over the global batch: ``loss``, ``accuracy`` (the fraction
    of images whose most similar text of the global batch is a positive)
    and the learned ``logit_scale`` (``exp(log_scale)``) and ``logit_bias``
    (SigLIP)."""
    image_BxD, text_BxD = (embeddings[m] for m in self.modalities)
    keys_BxK = self.text_keys(batch)
    log_scale, bias = (params[LOGIT_SCALE]["log_scale"],
                       params[LOGIT_SCALE].get("bias"))
    if self.loss == "clip":
      loss = clip_loss(image_BxD, text_BxD, log_scale, axis_name=axis_name,
                       text_keys_BxK=keys_BxK)
    else:
      loss = siglip_loss(image_BxD, text_BxD, log_scale, bias,
                         axis_name=axis_name, chunked=self.chunked,
                         text_keys_BxK=keys_BxK)
    terms = {"loss": loss,
             "accuracy": batch_accuracy(image_BxD, text_BxD, keys_BxK,
                                        axis_name),
             "logit_scale": jnp.exp(log_scale)}
    if bias is not None:
      terms["logit_bias"] = bias
    return terms


def batch_accuracy(image_BxD: jax.Array, text_BxD: jax.Array,
                   text_keys_BxK: jax.Array | None,
                   axis_name: str | None) -> jax.Array:
  """The fraction of the global batch's images whose most similar text (by
  cosine) is a positive: in-batch image-to-text recall@1."""
  image_NxD = gather_batch(l2_normalize(image_BxD), axis_name)
  text_NxD = gather_batch(l2_normalize(text_BxD), axis_name)
  n = image_NxD.shape[0]
  keys_NxK = (None if text_keys_BxK is None
              else gather_batch(text_keys_BxK, axis_name))
  positive_NxN = positives(n, n, diagonal=True, row_keys_RxK=keys_NxK,
                           column_keys_CxK=keys_NxK)
  best_N = jnp.argmax(image_NxD @ text_NxD.T, axis=1)
  return jnp.mean(positive_NxN[jnp.arange(n), best_N].astype(jnp.float32))


def embed_step(state: Any, batch: Mapping[str, jax.Array], *,
               model: nn.Module, objective: Objective, mask_key: str,
               axis_name: str | None) -> dict[str, jax.Array]:
  """The embeddings of one device's eval batch, gathered over devices.

  Returns ``{modality: [global_batch, dim]}``, ``mask_key`` (which rows are
  real examples), ``TEXT_KEYS`` (the text side's inputs, flattened: which
  texts are equal), and the learned ``LOG_SCALE`` and ``BIAS`` (0 for CLIP),
  for ``split_metrics``; the same on every device.
  """
  embeddings = model.apply({"params": state.params,
                            "batch_stats": state.batch_stats}, batch,
                           train=False)
  text = batch[objective.modalities[1]]
  outputs = {m: gather_batch(embeddings[m], axis_name)
             for m in objective.modalities}
  outputs[mask_key] = gather_batch(batch[mask_key], axis_name)
  outputs[TEXT_KEYS] = gather_batch(text.reshape(text.shape[0], -1),
                                    axis_name)
  scale = state.params[LOGIT_SCALE]
  outputs[LOG_SCALE] = scale["log_scale"]
  outputs[BIAS] = scale.get("bias", jnp.zeros(()))
  return outputs


def split_metrics(image_NxD: np.ndarray, text_NxD: np.ndarray,
                  text_keys_NxK: np.ndarray, log_scale: float, bias: float, *,
                  objective: Objective,
                  prompts_CxD: np.ndarray | None = None,
                  prompt_keys_CxK: np.ndarray | None = None
                  ) -> dict[str, float]:
  """A split's retrieval metrics from the embeddings of all its pairs.

  Returns ``recall@{1,5}/image_to_text`` and ``/text_to_image`` (a retrieved
  text identical to the query's own counts as correct, whatever
  ``objective.positives``), ``loss`` (``objective``'s loss with the whole
  split as one batch), and, given prompts, ``accuracy/zero_shot``: each
  image whose text equals one of the prompts (by key) classified as the
  prompt most similar to it (``zero_shot_accuracy``); omitted when no image
  has such a text.
  """
  _, text_ids_N = np.unique(text_keys_NxK, axis=0, return_inverse=True)
  text_ids_N = text_ids_N.reshape(-1)
  positive_NxN = text_ids_N[:, None] == text_ids_N[None, :]
  similarity_NxN = (np.asarray(l2_normalize(jnp.asarray(image_NxD))) @
                    np.asarray(l2_normalize(jnp.asarray(text_NxD))).T)
  metrics = {}
  for k in (1, 5):
    metrics[f"recall@{k}/image_to_text"] = recall_at_k(
        similarity_NxN, k, positive_NxN)
    metrics[f"recall@{k}/text_to_image"] = recall_at_k(
        similarity_NxN.T, k, positive_NxN.T)
  keys = None if objective.positives == "pair" else jnp.asarray(
      text_ids_N[:, None])
  if objective.loss == "clip":
    loss = clip_loss(image_NxD, text_NxD, jnp.float32(log_scale),
                     text_keys_BxK=keys)
  else:
    loss = siglip_loss(image_NxD, text_NxD, jnp.float32(log_scale),
                       jnp.float32(bias), text_keys_BxK=keys)
  metrics["loss"] = float(loss)
  if prompts_CxD is not None:
    prompt_of = {tuple(key): c for c, key in enumerate(
        np.asarray(prompt_keys_CxK).tolist())}
    labels_N = np.array([prompt_of.get(tuple(key), -1)
                         for key in np.asarray(text_keys_NxK).tolist()])
    scored_N = labels_N >= 0
    if scored_N.any():
      metrics["accuracy/zero_shot"] = zero_shot_accuracy(
          image_NxD[scored_N], prompts_CxD, labels_N[scored_N])
  return metrics
