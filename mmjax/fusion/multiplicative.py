"""Multiplicative interactions between one modality and the others.

Jayakumar, Czarnecki, Menick, Schwarz, Rae, Osindero, Teh, Harley & Pascanu,
2020, "Multiplicative Interactions and Where to Find Them", ICLR 2020.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.inputs import check_multimodal, in_sorted_order
from mmjax.registry import FUSIONS

FORMS = ("matrix", "vector", "scalar")


@FUSIONS.register("multiplicative")
class MultiplicativeFusion(nn.Module):
  """A multiplicative-interaction layer (Jayakumar et al. 2020).

  ``x [batch, dx]`` is the first modality's ``pooled`` in sorted name order
  (whatever the dict's order, ``in_sorted_order``) and ``z [batch, dz]`` the
  concatenation of every other modality's, in that order. ``z`` acts as a
  hypernetwork that produces the weights of a linear map applied to ``x``:
  ``out = W(z) x + b(z)`` with ``b(z) = U z + b``. The forms differ in how
  ``W(z)`` is parameterised:

    ``matrix``: ``W(z) = z^T W + V``, with ``W [dz, dx, dim]`` (the full
      3-tensor).
    ``vector``: ``W(z) = diag(z W_v + b_v) V``, a per-output gate on ``V x``.
    ``scalar``: ``W(z) = (z w_s + b_s) V``, one gate for all outputs.

  so ``out`` is ``z^T W x + V x + U z + b`` (matrix), ``(z W_v + b_v) * (V x)
  + U z + b`` (vector) or ``(z w_s + b_s) * (V x) + U z + b`` (scalar).

  ``W`` is initialised with variance ``1 / (dz * dx)``, so ``z^T W x`` starts
  with about unit variance for unit inputs, like ``V x``.

  Parameter count (``V`` and ``U`` have no bias; ``b`` is one ``[dim]``):
    matrix: ``dz * dx * dim + dx * dim + dz * dim + dim``.
    vector: ``(dz + 1) * dim + dx * dim + dz * dim + dim``.
    scalar: ``(dz + 1) + dx * dim + dz * dim + dim``.

  Attributes:
    form: one of ``"matrix"``, ``"vector"``, ``"scalar"``.
    dim: width of the output.
    dtype: compute dtype; parameters stay float32.
  """
  form: str = "matrix"
  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_m]``, into
    ``[batch, dim]``."""
    del train
    if self.form not in FORMS:
      raise ValueError(
          f"Unknown multiplicative form {self.form!r}. Valid forms: "
          f"{', '.join(FORMS)}.")
    check_multimodal(encodings, "Multiplicative")
    encodings = in_sorted_order(encodings)
    encs = list(encodings.values())
    x_BxX = encs[0].pooled
    z_BxZ = jnp.concatenate([enc.pooled for enc in encs[1:]], axis=-1)
    vx_BxD = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="V")(
        x_BxX)
    uz_BxD = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="U")(
        z_BxZ)
    b_D = self.param("b", nn.initializers.zeros, (self.dim,))
    if self.form == "matrix":
      init = nn.initializers.variance_scaling(
          1., "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
      w_ZxXxD = self.param(
          "W", init, (z_BxZ.shape[-1], x_BxX.shape[-1], self.dim))
      z_BxZ, x_BxX, w_ZxXxD = nn.dtypes.promote_dtype(
          z_BxZ, x_BxX, w_ZxXxD, dtype=self.dtype)
      wz_BxXxD = jnp.einsum("bz,zxd->bxd", z_BxZ, w_ZxXxD)
      mixed_BxD = jnp.einsum("bxd,bx->bd", wz_BxXxD, x_BxX) + vx_BxD
    elif self.form == "vector":
      gate_BxD = nn.Dense(self.dim, dtype=self.dtype, name="W_v")(z_BxZ)
      mixed_BxD = gate_BxD * vx_BxD
    else:
      gate_Bx1 = nn.Dense(1, dtype=self.dtype, name="w_s")(z_BxZ)
      mixed_BxD = gate_Bx1 * vx_BxD
    return mixed_BxD + uz_BxD + b_D.astype(self.dtype)
