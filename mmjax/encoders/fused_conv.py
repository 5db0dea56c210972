"""A fused LeNet block: convolution -> BatchNorm -> ReLU -> 2x2 max-pool.

The same maths as ``nn.Conv`` (SAME padding, no bias), ``nn.BatchNorm`` (batch
statistics, ``Var = E[y^2] - E[y]^2`` as flax computes it), ReLU and
``image.max_pool_2x2``, arranged for XLA:CPU, where these layers are slow on
the narrow feature maps at the start of LeNet (1 to 12 channels at 112x112
and 56x56: a few channels in the minor dimension vectorise badly):

* A one-channel input is convolved as ``k*k`` shifted multiply-adds in one
  fused loop instead of ``lax.conv_general_dilated`` (on AV-MNIST's 112x112
  spectrograms at batch 40, 3-7 ms instead of 27-36 ms on a 2-core CPU), and
  its kernel gradient is one variadic reduction (13 ms instead of 31 ms; 92
  instead of 281 ms at batch 256).
* Pooling comes before the normalisation. BatchNorm's affine map
  ``(y - mean) * mul + bias`` (``mul = scale / sqrt(var + eps)``) and ReLU
  are monotone in ``y`` (decreasing where ``mul < 0``), so the pooled output
  is the affine map and ReLU of the window's maximum of ``y`` (its minimum
  where ``mul < 0``); rounding is monotone too, so this holds in floating
  point up to how XLA contracts the multiply-add. The affine map and ReLU then
  run at a quarter of the resolution. One difference: where ``scale`` is
  exactly 0, every position of a window ties and the unfused layers' gradient
  for ``scale`` uses the window's mean of ``y``; this block uses its maximum.
* A hand-written backward pass (``jax.custom_vjp``) sends each window's
  gradient to its extreme positions (shared between ties, as ``jnp.max``'s
  gradient does) and adds BatchNorm's statistics terms in the same pass,
  where autodiff of the unfused layers makes several passes over the
  full-resolution map. Wider convolutions keep XLA's gradients (``jax.vjp``):
  per-tap products, per-tap matmuls and chunked batches were each slower
  than XLA's on some of LeNet's layers.

Mixed precision: ``x`` comes in the compute dtype (e.g. bfloat16) and the
kernel, ``scale`` and ``bias`` as float32 parameters. The convolution runs in
``x``'s dtype, the kernel rounded to it as ``nn.Conv(dtype=...)`` rounds it;
the batch statistics, BatchNorm's affine map and every gradient of the
statistics are computed in float32, as ``nn.BatchNorm`` reduces in float32;
the output is in ``x``'s dtype, and each gradient in its argument's dtype.
In float32 every cast is the identity.

``tests/test_fused_conv.py`` checks values and gradients against the unfused
layers, with and without a data-parallel axis; ``tests/test_mixed_precision.py``
checks them in bfloat16.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

BN_EPSILON = 1e-5  # flax's BatchNorm default.


def accumulation_dtype(dtype: Any) -> Any:
  """The dtype sums over many values of ``dtype`` run in: float32 for
  bfloat16 and float16, ``dtype`` itself for float32 and float64."""
  return jnp.promote_types(dtype, jnp.float32)


def conv_same(x_BxHxWxC: jax.Array, kernel_KxKxCxO: jax.Array) -> jax.Array:
  """SAME-padded, stride-1 convolution without bias (as ``nn.Conv``).

  ``[batch, height, width, in] * [k, k, in, out] -> [batch, height, width,
  out]``, in the dtype of ``x`` (the kernel is rounded to it). A one-channel
  input is convolved as ``k*k`` shifted multiply-adds, which XLA fuses into
  one loop, summed in ``accumulation_dtype`` as GPUs and TPUs sum a bfloat16
  convolution; wider inputs use ``lax.conv_general_dilated``.
  """
  dtype = x_BxHxWxC.dtype
  kernel_KxKxCxO = kernel_KxKxCxO.astype(dtype)
  if x_BxHxWxC.shape[-1] != 1:
    return _lax_conv(x_BxHxWxC, kernel_KxKxCxO)
  acc = accumulation_dtype(dtype)
  kh, kw = kernel_KxKxCxO.shape[:2]
  out = None
  for (i, j), shifted in _shifted_inputs(x_BxHxWxC.astype(acc), kh, kw):
    term = shifted * kernel_KxKxCxO[i, j, 0].astype(acc)
    out = term if out is None else out + term
  return out.astype(dtype)


def _lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``lax.conv_general_dilated`` in ``x``'s dtype, the kernel rounded to
  it."""
  return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted_inputs(x_BxHxWxC: jax.Array, kh: int, kw: int):
  """``((i, j), x shifted by (i, j))`` for each kernel tap: SAME padding's
  ``x_padded[:, i:i + height, j:j + width]``."""
  _, height, width, _ = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), ((kh - 1) // 2, kh // 2),
                               ((kw - 1) // 2, kw // 2), (0, 0)))
  for i in range(kh):
    for j in range(kw):
      yield (i, j), padded[:, i:i + height, j:j + width]


def _conv_gradients(x: jax.Array, kernel: jax.Array, d_y: jax.Array):
  """``(d_x, d_kernel)`` of ``conv_same`` for the output gradient ``d_y``
  (in ``accumulation_dtype``), in the dtypes of ``x`` and ``kernel``.

  For a one-channel input, ``d_kernel[i, j, 0, o]`` is the sum over batch and
  space of ``x`` shifted by ``(i, j)`` times ``d_y[..., o]``: all ``k*k`` sums
  in one variadic reduction in ``d_y``'s dtype, which reads ``d_y`` once (3x
  faster than XLA's weight gradient on 112x112 spectrograms, at batch 40 and
  256). Otherwise, and for ``d_x``, XLA's gradients of the convolution, which
  take ``d_y`` rounded to ``x``'s dtype.
  """
  d_y_rounded = d_y.astype(x.dtype)
  if x.shape[-1] != 1:
    _, conv_vjp = jax.vjp(_lax_conv, x, kernel)
    return conv_vjp(d_y_rounded)
  _, input_vjp = jax.vjp(lambda x: _lax_conv(x, kernel), x)
  (d_x,) = input_vjp(d_y_rounded)
  kh, kw, _, out = kernel.shape
  products = tuple(shifted * d_y for _, shifted in
                   _shifted_inputs(x.astype(d_y.dtype), kh, kw))
  sums = lax.reduce(products, (jnp.zeros((), d_y.dtype),) * len(products),
                    lambda a, b: tuple(u + v for u, v in zip(a, b)),
                    (0, 1, 2))
  d_kernel = jnp.stack(sums).reshape(kh, kw, 1, out)
  return d_x, d_kernel.astype(kernel.dtype)


def _windows(y_BxHxWxC: jax.Array) -> jax.Array:
  """``[b, h, w, c] -> [b, h // 2, 2, w // 2, 2, c]``, dropping an odd last
  row or column (as ``image.max_pool_2x2``)."""
  b, h, w, c = y_BxHxWxC.shape
  y = y_BxHxWxC[:, :h // 2 * 2, :w // 2 * 2]
  return y.reshape(b, h // 2, 2, w // 2, 2, c)


def _batch_stats(y: jax.Array, axis_name: str | None):
  """flax's fast variance: ``(E[y], E[y^2])`` over batch and space, in
  ``accumulation_dtype`` (as ``nn.BatchNorm``), averaged over
  ``axis_name``."""
  y = y.astype(accumulation_dtype(y.dtype))
  mean, mean2 = y.mean((0, 1, 2)), jnp.square(y).mean((0, 1, 2))
  if axis_name is not None:
    mean, mean2 = lax.pmean(jnp.stack([mean, mean2]), axis_name)
  return mean, mean2


def _corners(windows: jax.Array) -> list[jax.Array]:
  """The four ``[b, h // 2, w // 2, c]`` corners of ``_windows``'s 2x2
  windows."""
  return [windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


def _pooled_extreme(y: jax.Array, mul: jax.Array) -> jax.Array:
  """Each 2x2 window's maximum of ``y`` where ``mul >= 0``, else its minimum:
  the ``y`` at which ``(y - mean) * mul + bias`` is largest. (Elementwise
  maxima of the corners: XLA:CPU reduces windows several times slower.)"""
  sign = jnp.where(mul >= 0, 1.0, -1.0).astype(y.dtype)
  corners = _corners(_windows(y * sign))
  return sign * functools.reduce(jnp.maximum, corners)


def normalize_relu_pool(y: jax.Array, mean: jax.Array, var: jax.Array,
                        scale: jax.Array, bias: jax.Array) -> jax.Array:
  """``max_pool_2x2(relu(BatchNorm(y)))`` with the given statistics, pooled
  first: ``[b, h, w, c] -> [b, h // 2, w // 2, c]`` in ``y``'s dtype (the
  affine map in the statistics' float32, as ``nn.BatchNorm``)."""
  mul = lax.rsqrt(var + BN_EPSILON) * scale
  return jax.nn.relu((_pooled_extreme(y, mul) - mean) * mul + bias).astype(
      y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def conv_bn_relu_pool(x, kernel, scale, bias, axis_name=None):
  """Convolution, BatchNorm with batch statistics, ReLU and 2x2 max-pool.

  Args:
    x: ``[batch, height, width, in]``, in the compute dtype.
    kernel: ``[k, k, in, out]``, SAME padding; rounded to ``x``'s dtype.
    scale, bias: BatchNorm's ``[out]`` parameters.
    axis_name: the data-parallel axis over which the statistics are averaged
      (as ``nn.BatchNorm(axis_name=...)``), or None.

  Returns:
    ``(out [batch, height // 2, width // 2, out], mean [out], var [out])``:
    the block's output in ``x``'s dtype and the batch statistics in
    ``accumulation_dtype``, for the running averages.
  """
  out, mean, var, _ = _forward(x, kernel, scale, bias, axis_name)
  return out, mean, var


def _forward(x, kernel, scale, bias, axis_name):
  y = conv_same(x, kernel)
  mean, mean2 = _batch_stats(y, axis_name)
  var = jnp.maximum(0.0, mean2 - jnp.square(mean))
  mul = lax.rsqrt(var + BN_EPSILON) * scale
  extreme = _pooled_extreme(y, mul)
  out = jax.nn.relu((extreme - mean) * mul + bias).astype(y.dtype)
  residuals = (x, kernel, scale, bias, y, extreme, mean, mean2, var)
  return out, mean, var, residuals


def _forward_rule(x, kernel, scale, bias, axis_name):
  out, mean, var, residuals = _forward(x, kernel, scale, bias, axis_name)
  return (out, mean, var), residuals


def _backward_rule(axis_name, residuals, cotangents):
  x, kernel, scale, bias, y, extreme, mean, mean2, var = residuals
  d_out, d_mean_out, d_var_out = cotangents
  d_out = d_out.astype(mean.dtype)  # From here on, in accumulation_dtype.
  inv_std = lax.rsqrt(var + BN_EPSILON)
  mul = inv_std * scale
  centered = extreme - mean
  # Through ReLU and the affine map, at the pooled resolution.
  d_z = jnp.where(centered * mul + bias > 0, d_out, 0.0)
  d_bias = d_z.sum((0, 1, 2))
  d_mul = (d_z * centered).sum((0, 1, 2))
  d_extreme = d_z * mul
  # mul = scale / sqrt(var + eps); var = max(0, E[y^2] - E[y]^2).
  d_scale = d_mul * inv_std
  d_var = d_mul * scale * -0.5 * inv_std**3 + d_var_out
  d_mean2 = jnp.where(mean2 - jnp.square(mean) > 0, d_var, 0.0)
  d_mean = -d_bias * mul + d_mean_out - 2.0 * mean * d_mean2
  if axis_name is not None:  # The transpose of the statistics' pmean.
    d_mean, d_mean2 = lax.pmean(jnp.stack([d_mean, d_mean2]), axis_name)
  count = y.shape[0] * y.shape[1] * y.shape[2]
  # Each window's gradient goes to its extreme positions, split between ties.
  windows = _windows(y)
  ties = sum((corner == extreme).astype(y.dtype)
             for corner in _corners(windows))
  at_extreme = windows == extreme[:, :, None, :, None, :]
  d_windows = jnp.where(at_extreme, (d_extreme / ties)[:, :, None, :, None, :],
                        0.0)
  b, h, w, c = y.shape
  d_pooled = d_windows.reshape(b, h // 2 * 2, w // 2 * 2, c)
  d_pooled = jnp.pad(d_pooled, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  d_y = d_pooled + (d_mean + 2.0 * y * d_mean2) / count
  d_x, d_kernel = _conv_gradients(x, kernel, d_y)
  # Each cotangent in its primal's dtype, as custom_vjp requires.
  return d_x, d_kernel, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


conv_bn_relu_pool.defvjp(_forward_rule, _backward_rule)
