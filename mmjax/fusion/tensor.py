"""Tensor fusion and its low-rank factorisation.

Zadeh, Chen, Poria, Cambria & Morency, 2017, "Tensor Fusion Network for
Multimodal Sentiment Analysis", arXiv:1707.07250.

Liu, Shen, Lakshminarasimhan, Liang, Zadeh & Morency, 2018, "Efficient
Low-rank Multimodal Fusion with Modality-Specific Factors", arXiv:1806.00064.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_multimodal, in_sorted_order
from mmjax.registry import FUSIONS


def append_one(z_BxD: jax.Array) -> jax.Array:
  """``[batch, dim] -> [batch, dim + 1]``, the last entry 1.

  The constant 1 keeps the lower-order terms in a product across modalities:
  unimodal and bimodal interactions survive next to the full M-way one.
  """
  return jnp.concatenate([z_BxD, jnp.ones_like(z_BxD[:, :1])], axis=-1)


def outer_product(zs: list[jax.Array]) -> jax.Array:
  """Flattened outer product of ``[batch, d_m]`` vectors, ``[batch, prod d_m]``.

  The first vector's index varies slowest, as in ``jnp.einsum('bi,bj->bij')``.
  """
  acc_BxK = zs[0]
  for z_BxD in zs[1:]:
    acc_BxK = jnp.einsum("bk,bd->bkd", acc_BxK, z_BxD).reshape(
        acc_BxK.shape[0], -1)
  return acc_BxK


@FUSIONS.register("tensor")
class TensorFusion(Fusion):
  """Tensor Fusion Network's fusion layer (Zadeh et al. 2017).

  Each modality's ``pooled [batch, d_m]`` gets a constant 1 appended; the
  outer product across all modalities, flattened to ``[batch, prod_m (d_m +
  1)]``, goes through ``Dense(dim)`` and ReLU::

    out = ReLU(vec([z_1; 1] (x) [z_2; 1] (x) ... (x) [z_M; 1]) W + b)

  The first modality's index (by name) varies slowest in the flattened
  product.

  The outer product grows as the product of the widths: three 128-d
  modalities give 2.2M features and, with ``dim=128``, a 280M-parameter
  ``Dense``. Set ``project`` to first map each modality to ``project`` dims
  with its own ``Dense`` (no activation).

  Where this differs from the paper:

  1. The paper fuses exactly three modalities (language, visual, acoustic);
     here any ``M >= 2``.
  2. The paper feeds the flattened product to its sentiment inference
     subnetwork, a fully connected network; this block is that network's
     first layer, and the model's head is the rest.
  3. ``project`` is mmjax's option; the paper feeds its modality embedding
     subnetworks' outputs straight into the product.

  Parameter count, with ``d_m`` the pooled widths and ``M`` modalities:
    ``project == 0``: ``prod_m (d_m + 1) * dim + dim``.
    ``project > 0``:  ``sum_m (d_m + 1) * project + (project + 1)**M * dim
    + dim``.

  Attributes:
    dim: width of the output.
    project: if > 0, width each modality is projected to before the product.
    dtype: compute dtype (of the product too); parameters stay float32.
  """
  dim: int = 128
  project: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_m]``, into
    ``[batch, dim]``."""
    del train
    check_multimodal(encodings, "Tensor")
    encodings = in_sorted_order(encodings)
    zs = []
    for name, enc in encodings.items():
      z_BxD = jnp.asarray(enc.pooled, self.dtype)
      if self.project > 0:
        z_BxD = nn.Dense(self.project, dtype=self.dtype,
                         name=f"project_{name}")(z_BxD)
      zs.append(append_one(z_BxD))
    z_BxK = outer_product(zs)
    return nn.relu(nn.Dense(self.dim, dtype=self.dtype, name="out")(z_BxK))


@FUSIONS.register("low_rank")
class LowRankFusion(Fusion):
  """Low-rank Multimodal Fusion (Liu et al. 2018).

  TFN's weight tensor, ``[d_1 + 1, ..., d_M + 1, dim]``, is replaced by a sum
  of ``rank`` outer products of modality-specific factors ``W_m^r [d_m + 1,
  dim]``, so the outer product of the inputs is never formed::

    out = sum_r prod_m (append_one(z_m) @ W_m^r) + bias

  with ``prod_m`` elementwise over ``[batch, dim]``. Each modality's factors
  are one parameter ``factor_<modality> [rank, d_m + 1, dim]``, so the block
  does not depend on the dict order.

  The reference code also learns weights over the rank (``fusion_weights``,
  ``[rank]``). They are redundant: any one modality's factors absorb them, so
  we leave them out.

  Factors are initialised with variance ``1 / (d_m + 1)``, so each per-modality
  term ``append_one(z_m) @ W_m^r`` starts with about unit variance for unit
  inputs, and their product does not shrink with the number of modalities
  (mmjax's choice).

  Where this differs from the paper and its reference code:

  1. The code's rank weights are left out (above); its output bias
     (``fusion_bias``) is ``bias`` here.
  2. The initialisation is mmjax's.
  3. The paper's three modalities are language, visual and acoustic; here
     any ``M >= 2``, in sorted name order.

  Parameter count: ``rank * sum_m (d_m + 1) * dim + dim``.

  Attributes:
    rank: number of rank-one terms.
    dim: width of the output.
    dtype: compute dtype; parameters stay float32.
  """
  rank: int = 4
  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_m]``, into
    ``[batch, dim]``."""
    del train
    check_multimodal(encodings, "Low-rank")
    encodings = in_sorted_order(encodings)
    init = nn.initializers.variance_scaling(
        1., "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=0)
    prod_BxRxD = None
    for name, enc in encodings.items():
      z_BxI = append_one(enc.pooled)
      w_RxIxD = self.param(f"factor_{name}", init,
                           (self.rank, z_BxI.shape[-1], self.dim))
      z_BxI, w_RxIxD = nn.dtypes.promote_dtype(z_BxI, w_RxIxD,
                                               dtype=self.dtype)
      f_BxRxD = jnp.einsum("bi,rid->brd", z_BxI, w_RxIxD)
      prod_BxRxD = f_BxRxD if prod_BxRxD is None else prod_BxRxD * f_BxRxD
    bias_D = self.param("bias", nn.initializers.zeros, (self.dim,))
    return prod_BxRxD.sum(axis=1) + bias_D.astype(self.dtype)
