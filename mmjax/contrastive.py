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

Retrieval: ``recall_at_k`` and ``zero_shot_accuracy`` score similarity
matrices on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CLIP_LOG_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOG_SCALE_INIT = math.log(10.0)
SIGLIP_BIAS_INIT = -10.0


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


def clip_loss(image_BxD: jax.Array, text_BxD: jax.Array,
              log_scale: jax.Array, *, axis_name: str | None = None
              ) -> jax.Array:
  """CLIP's symmetric softmax loss over the global batch (module docstring).

  Args:
    image_BxD, text_BxD: this device's embeddings of its pairs (normalised
      here).
    log_scale: the learned log of the logits' scale, a scalar.
    axis_name: the data-parallel axis, or None on one device.

  Returns:
    The global batch's loss, a scalar (the same on every device).
  """
  image_NxD = gather_batch(l2_normalize(image_BxD), axis_name)
  text_NxD = gather_batch(l2_normalize(text_BxD), axis_name)
  logits_NxN = image_NxD @ text_NxD.T * jnp.exp(log_scale)
  diagonal_N = jnp.diagonal(logits_NxN)
  image_to_text = jax.nn.logsumexp(logits_NxN, axis=1) - diagonal_N
  text_to_image = jax.nn.logsumexp(logits_NxN, axis=0) - diagonal_N
  return (image_to_text.mean() + text_to_image.mean()) / 2


def _sigmoid_pair_terms(image_BxD: jax.Array, text_BxD: jax.Array,
                        log_scale: jax.Array, bias: jax.Array,
                        positive: bool) -> jax.Array:
  """``sum log sigmoid(label * logit)`` over the block's pairs, with label +1
  on the diagonal if ``positive`` (a block of matching pairs) and -1 for
  every other pair."""
  logits_BxB = image_BxD @ text_BxD.T * jnp.exp(log_scale) + bias
  n = logits_BxB.shape[0]
  labels_BxB = (2 * jnp.eye(n) - 1) if positive else -jnp.ones((n, n))
  return jnp.sum(jax.nn.log_sigmoid(labels_BxB * logits_BxB))


def siglip_loss(image_BxD: jax.Array, text_BxD: jax.Array,
                log_scale: jax.Array, bias: jax.Array, *,
                axis_name: str | None = None, chunked: bool = False
                ) -> jax.Array:
  """SigLIP's sigmoid loss over the global batch (module docstring).

  Args:
    image_BxD, text_BxD: this device's embeddings of its pairs (normalised
      here).
    log_scale, bias: the learned log-scale and bias, scalars.
    axis_name: the data-parallel axis, or None on one device.
    chunked: pass the texts around the ring of devices instead of gathering
      them (the same value; less memory with many devices).

  Returns:
    ``-sum over all global pairs of log sigmoid(label * logit) / global
    batch``, a scalar (the same on every device).
  """
  image_BxD, text_BxD = l2_normalize(image_BxD), l2_normalize(text_BxD)
  if axis_name is None or not chunked:
    image_NxD = gather_batch(image_BxD, axis_name)
    text_NxD = gather_batch(text_BxD, axis_name)
    return -_sigmoid_pair_terms(image_NxD, text_NxD, log_scale, bias,
                                positive=True) / image_NxD.shape[0]
  devices = jax.lax.axis_size(axis_name)
  total = _sigmoid_pair_terms(image_BxD, text_BxD, log_scale, bias,
                              positive=True)
  ring = [(i, (i + 1) % devices) for i in range(devices)]
  for _ in range(devices - 1):
    text_BxD = jax.lax.ppermute(text_BxD, axis_name, ring)
    total = total + _sigmoid_pair_terms(image_BxD, text_BxD, log_scale, bias,
                                        positive=False)
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
