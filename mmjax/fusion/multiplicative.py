"""Multiplicative interactions between one modality and the others.

Jayakumar, Czarnecki, Menick, Schwarz, Rae, Osindero, Teh, Harley & Pascanu,
2020, "Multiplicative Interactions and Where to Find Them", ICLR 2020
(OpenReview rylnK6VtDH; no arXiv version).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_multimodal, in_sorted_order
from mmjax.fusion.tensor import outer_product
from mmjax.registry import FUSIONS

FORMS = ("matrix", "vector", "scalar")


@FUSIONS.register("multiplicative")
class MultiplicativeFusion(Fusion):
  """A multiplicative-interaction layer (Jayakumar et al. 2020).

  ``x [batch, dx]`` is the first modality's ``pooled`` in sorted name order
  and ``z [batch, dz]`` the concatenation of every other modality's, in that
  order. The paper's layer is

    ``f(x, z) = z^T W x + z^T U + V x + b``

  with ``W [dz, dx, dim]``, ``U [dz, dim]``, ``V [dx, dim]``, ``b [dim]``: a
  hypernetwork, ``z`` giving the weights ``W'(z) = z^T W + V`` and bias
  ``b'(z) = z^T U + b`` of a linear map of ``x``. ``form`` chooses how
  ``W'(z)`` is parameterised; every form keeps ``b'(z)``:

    ``matrix``: the full form above, ``out = z^T W x + V x + z^T U + b``.
    ``vector``: ``W'(z) = diag(z^T W_v + b_v) V``,
      ``out = (z^T W_v + b_v) * (V x) + z^T U + b``.
    ``scalar``: ``W'(z) = (z^T w_s + b_s) V``,
      ``out = (z^T w_s + b_s) * (V x) + z^T U + b``.

  (Parameters: ``W`` ``[dz, dx, dim]``; ``W_v`` the kernel of ``Dense`` "W_v"
  and ``b_v`` its bias; ``w_s``, ``b_s`` of ``Dense`` "w_s"; ``U``, ``V`` the
  bias-free ``Dense`` "U", "V"; ``b`` a ``[dim]`` parameter.)

  Where this differs from the paper:

  1. The paper's diagonal form gates ``x`` itself, ``W'(z) = diag(z^T W +
     v)``, so its output has ``x``'s width. ``vector`` gates ``V x``
     instead, a learned projection of ``x`` to ``dim``, so that its output
     width is free like the other forms'; it is the paper's diagonal form
     applied to ``V x``, with ``b_v`` in the role of the paper's ``v``.
  2. ``scalar`` (one gate shared by all outputs) likewise scales ``V x``,
     and its bias ``z^T U + b`` is a vector; MultiBench's ``scalar`` form
     (Liang et al. 2021, arXiv:2107.07502) scales ``x`` itself and adds a
     scalar bias. The names ``matrix``/``vector``/``scalar`` are
     MultiBench's, for the shape of ``W'(z)``'s free part per example.
  3. The paper combines two inputs; with ``M > 2`` modalities ``z`` is the
     concatenation of all but the first, which is mmjax's choice, as is
     which modality is ``x``.
  4. ``W`` is initialised with variance ``1 / (dz * dx)``, so ``z^T W x``
     starts with about unit variance for unit inputs, like ``V x`` (mmjax's
     choice).

  Parameter count (``V`` and ``U`` have no bias; ``b`` is one ``[dim]``):
    matrix: ``dz * dx * dim + dx * dim + dz * dim + dim``.
    vector: ``(dz + 1) * dim + dx * dim + dz * dim + dim``.
    scalar: ``(dz + 1) + dx * dim + dz * dim + dim``.

  Attributes:
    form: one of ``FORMS``.
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
      # z^T W x as one [batch, dz*dx] x [dz*dx, dim] matmul of the outer
      # product z x^T with W: contracting z with W first wrote a
      # [batch, dx, dim] tensor and was 4x slower forward and backward on CPU
      # (AV-MNIST's 3-seed step: 213-239 -> 312-329 examples/s).
      zx_BxZX = outer_product([z_BxZ, x_BxX])
      mixed_BxD = zx_BxZX @ w_ZxXxD.reshape(-1, self.dim) + vx_BxD
    elif self.form == "vector":
      gate_BxD = nn.Dense(self.dim, dtype=self.dtype, name="W_v")(z_BxZ)
      mixed_BxD = gate_BxD * vx_BxD
    else:
      gate_Bx1 = nn.Dense(1, dtype=self.dtype, name="w_s")(z_BxZ)
      mixed_BxD = gate_Bx1 * vx_BxD
    return mixed_BxD + uz_BxD + b_D.astype(self.dtype)
