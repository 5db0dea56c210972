"""Factorised bilinear pooling: MFB and MUTAN.

Yu, Yu, Fan & Tao, 2017, "Multi-modal Factorized Bilinear Pooling with
Co-Attention Learning for Visual Question Answering", arXiv:1708.01471.

Ben-younes, Cadene, Cord & Thome, 2017, "MUTAN: Multimodal Tucker Fusion for
Visual Question Answering", arXiv:1705.06676.

Both papers fuse two modalities (question and image). With ``M > 2``
modalities both blocks take the elementwise product over all ``M``
projections, the M-way analogue of the bilinear form (a rank-constrained
``M+1``-order tensor in place of the 3-order one). Parameters and dropout
streams are named after the modality and the product is symmetric, so the
result does not depend on the dict order (``jax.jit`` sorts dict keys).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_multimodal, in_sorted_order
from mmjax.registry import FUSIONS

# Offset inside the signed square root: its slope at 0 is 1 / (2 sqrt(EPS)),
# large but finite, where the plain sqrt's is infinite.
POWER_EPS = 1e-8
# Floor on the squared L2 norm, so an all-zero vector maps to zero, not NaN.
L2_EPS = 1e-24


def signed_sqrt(z: jax.Array) -> jax.Array:
  """Power normalisation ``sign(z) * sqrt(|z|)``, with finite gradients.

  Computed as ``sign(z) * (sqrt(|z| + eps) - sqrt(eps))``: within
  ``sqrt(eps) = 1e-4`` of the exact value and with gradient at most
  ``1 / (2 sqrt(eps))`` everywhere, including at 0.
  """
  return jnp.sign(z) * (jnp.sqrt(jnp.abs(z) + POWER_EPS) - POWER_EPS**0.5)


def l2_normalize(z_BxD: jax.Array) -> jax.Array:
  """Scales each row to unit L2 norm; an all-zero row stays zero (and has
  finite gradients). The norm is summed in float32 (at least), as
  ``nn.LayerNorm`` sums its statistics; the result has ``z``'s dtype."""
  wide_BxD = z_BxD.astype(jnp.promote_types(z_BxD.dtype, jnp.float32))
  sq_Bx1 = jnp.sum(jnp.square(wide_BxD), axis=-1, keepdims=True)
  return z_BxD * jax.lax.rsqrt(jnp.maximum(sq_Bx1, L2_EPS)).astype(
      z_BxD.dtype)


@FUSIONS.register("mfb")
class MFBFusion(Fusion):
  """Multi-modal Factorized Bilinear pooling (Yu et al. 2017).

  Each modality's ``pooled [batch, d_m]`` is projected by its own
  ``Dense(dim * factor)``; the projections are multiplied elementwise across
  modalities, dropped out (training only, rng collection ``'dropout'``) and
  sum-pooled over non-overlapping windows of ``factor``::

    z = SumPool_k(prod_m Dense_m(x_m))        [batch, dim]

  so each output is a rank-``factor`` bilinear (M-linear for ``M`` modalities)
  form of the inputs. With ``normalize`` the result is power-normalised,
  ``sign(z) sqrt(|z|)``, then L2-normalised per example, as in the paper; both
  are computed so that gradients stay finite at ``z = 0`` (see
  ``signed_sqrt``, ``l2_normalize``).

  Where this differs from the paper:

  1. The paper's projections, ``z_i = 1^T (U_i^T x * V_i^T y)``, have no
     biases; each ``Dense`` here keeps one.
  2. More than two modalities (see the module docstring).
  3. In the paper MFB fuses a question with image features, also inside a
     co-attention network; this block is the fusion alone, on pooled
     vectors. The paper's sizes are ``factor = 5``
     and ``dim = 1000``.

  Parameter count, ``d_m`` the pooled widths: ``sum_m (d_m + 1) * dim *
  factor``.

  Attributes:
    dim: width of the output (the paper's ``o``).
    factor: the latent factor ``k``; each output sums ``k`` products.
    dropout: dropout rate on the elementwise product.
    normalize: power and L2 normalisation of the output.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 128
  factor: int = 5
  dropout: float = 0.1
  normalize: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_m]``, into
    ``[batch, dim]``."""
    check_multimodal(encodings, "MFB")
    encodings = in_sorted_order(encodings)
    prod_BxK = None
    for name, enc in encodings.items():
      p_BxK = nn.Dense(self.dim * self.factor, dtype=self.dtype,
                       name=f"proj_{name}")(enc.pooled)
      prod_BxK = p_BxK if prod_BxK is None else prod_BxK * p_BxK
    prod_BxK = nn.Dropout(self.dropout, deterministic=not train)(prod_BxK)
    z_BxD = prod_BxK.reshape(-1, self.dim, self.factor).sum(axis=-1)
    if self.normalize:
      z_BxD = l2_normalize(signed_sqrt(z_BxD))
    return z_BxD


@FUSIONS.register("mutan")
class MutanFusion(Fusion):
  """MUTAN: multimodal Tucker fusion (Ben-younes et al. 2017).

  The bilinear map ``T x_1 x_2`` is Tucker-decomposed: factor matrices map
  each modality to ``hidden`` dims, ``x~_m = tanh(Dense_m(hidden)(x_m))``; the
  core tensor, of output width ``mm_dim``, is constrained to rank ``rank``,
  which gives::

    z = sum_r prod_m (x~_m W_m^r)        [batch, mm_dim]
    out = Dense(dim)(z)                  [batch, dim]

  with ``prod_m`` elementwise. The ``rank`` maps ``W_m^r [hidden, mm_dim]`` of
  one modality are a single ``Dense(rank * mm_dim)``, reshaped to ``[batch,
  rank, mm_dim]``. Dropout (training only, rng ``'dropout'``) is applied to
  each ``x~_m``, as in the reference implementation. The paper's VQA model
  uses ``hidden = 310`` and ``mm_dim = 510`` with ``rank = 5`` and feeds ``z``
  to its classifier; the output ``Dense(dim)`` is mmjax's, so that every
  fusion returns ``[batch, dim]``.

  Where this differs from the paper:

  1. The paper writes its factor matrices without biases; each ``Dense``
     here keeps one.
  2. The output ``Dense(dim)`` (above) is mmjax's.
  3. More than two modalities (see the module docstring).

  Parameter count, ``d_m`` the pooled widths, ``H = hidden``, ``M = mm_dim``,
  ``R = rank``: ``sum_m [(d_m + 1) * H + (H + 1) * R * M] + (M + 1) * dim``.

  Attributes:
    dim: width of the output.
    hidden: width of each projected modality (the paper's ``t_q = t_v``).
    mm_dim: width of the core tensor's output ``z`` (the paper's ``t_o``);
      0 ties it to ``hidden``.
    rank: rank ``R`` of the core tensor.
    dropout: dropout rate on the projected modalities.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 128
  hidden: int = 64
  mm_dim: int = 0
  rank: int = 5
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_m]``, into
    ``[batch, dim]``."""
    check_multimodal(encodings, "MUTAN")
    encodings = in_sorted_order(encodings)
    mm_dim = self.mm_dim or self.hidden
    prod_BxRxM = None
    for name, enc in encodings.items():
      x_BxH = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype,
                                name=f"proj_{name}")(enc.pooled))
      x_BxH = nn.Dropout(self.dropout, deterministic=not train,
                         name=f"dropout_{name}")(x_BxH)
      r_BxRxM = nn.Dense(self.rank * mm_dim, dtype=self.dtype,
                         name=f"rank_{name}")(x_BxH).reshape(
                             -1, self.rank, mm_dim)
      prod_BxRxM = r_BxRxM if prod_BxRxM is None else prod_BxRxM * r_BxRxM
    z_BxM = prod_BxRxM.sum(axis=1)
    return nn.Dense(self.dim, dtype=self.dtype, name="out")(z_BxM)
