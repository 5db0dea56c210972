"""A fused LeNet block: convolution -> BatchNorm -> ReLU -> 2x2 max-pool.

The same maths as ``nn.Conv`` (SAME padding, no bias), ``nn.BatchNorm`` (batch
statistics, ``Var = E[y^2] - E[y]^2`` as flax computes it), ReLU and
``image.max_pool_2x2``, arranged for XLA:CPU, where these layers are slow on
the narrow feature maps at the start of LeNet (1 to 12 channels at 112x112
and 56x56: a few channels in the minor dimension vectorise badly):

* Planar layout (``planar=True``): the maps are ``[channels, batch, height,
  width]``, each channel a plane, so that elementwise work vectorises along
  the width instead of over a few channels. The convolution is then a sum of
  ``k*k*in`` shifted planes, each times one kernel entry per output channel,
  which XLA fuses into one loop; its input gradient is the same sum with the
  kernel flipped; the kernel gradient of a one-channel input is one variadic
  reduction, of a wider one XLA's (in ``[batch, height, width, channels]``).
  On AV-MNIST's second audio layer (56x56, 6 -> 12, batch 40, one core) the
  convolution takes 5.7 ms instead of XLA's 14.5 and its input gradient 8.0
  instead of 18.6; planes lose to XLA's convolutions from about 12 -> 24
  channels (``PLANAR_MAX_WEIGHTS``).
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
  full-resolution map; in the planar layout that gradient is written to
  memory once (``_computed_once``) before the convolution's gradients read
  it. Blocks in the usual layout keep XLA's convolution gradients
  (``jax.vjp``).

Mixed precision: ``x`` comes in the compute dtype (e.g. bfloat16) and the
kernel, ``scale`` and ``bias`` as float32 parameters. The convolution runs in
``x``'s dtype, the kernel rounded to it as ``nn.Conv(dtype=...)`` rounds it
(planar sums accumulate in ``accumulation_dtype``, as GPUs and TPUs sum a
bfloat16 convolution); the batch statistics, BatchNorm's affine map and
every gradient of the statistics are computed in float32, as
``nn.BatchNorm`` reduces in float32; the output is in ``x``'s dtype, and each
gradient in its argument's dtype. In float32 every cast is the identity.

``tests/test_fused_conv.py`` checks values and gradients against the unfused
layers in both layouts, with and without a data-parallel axis;
``tests/test_mixed_precision.py`` checks them in bfloat16.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

BN_EPSILON = 1e-5  # flax's BatchNorm default.
# Planar blocks beat XLA's convolutions up to this many kernel weights per
# tap, in x out channels (6 x 12 on AV-MNIST's second audio layer; 12 x 24 on
# the third is 2.5x slower forward), on maps at least this wide (an AVX-512
# vector holds 16 float32: at 14 pixels wide the second image layer's input
# gradient took 5.2 ms instead of XLA's 1.2).
PLANAR_MAX_WEIGHTS = 72
PLANAR_MIN_WIDTH = 16


def use_planar(in_channels: int, out_channels: int, width: int) -> bool:
  """Whether a block of these channels, on maps of this width, runs in the
  planar layout."""
  return (in_channels * out_channels <= PLANAR_MAX_WEIGHTS and
          width >= PLANAR_MIN_WIDTH)


def to_planar(x_BxHxWxC: jax.Array) -> jax.Array:
  """``[batch, height, width, channels] -> [channels, batch, height,
  width]``."""
  return jnp.transpose(x_BxHxWxC, (3, 0, 1, 2))


def from_planar(x_CxBxHxW: jax.Array) -> jax.Array:
  """``[channels, batch, height, width] -> [batch, height, width,
  channels]``."""
  return jnp.transpose(x_CxBxHxW, (1, 2, 3, 0))


def accumulation_dtype(dtype: Any) -> Any:
  """The dtype sums over many values of ``dtype`` run in: float32 for
  bfloat16 and float16, ``dtype`` itself for float32 and float64."""
  return jnp.promote_types(dtype, jnp.float32)


def conv_same(x: jax.Array, kernel_KxKxCxO: jax.Array,
              planar: bool = False) -> jax.Array:
  """SAME-padded, stride-1 convolution without bias (as ``nn.Conv``).

  ``x [batch, height, width, in]`` (planar: ``[in, batch, height, width]``)
  times ``kernel [k, k, in, out]`` -> ``[batch, height, width, out]``
  (planar: ``[out, batch, height, width]``), in the dtype of ``x`` (the
  kernel is rounded to it): ``lax.conv_general_dilated``, or planar
  ``_shifted_sum``.
  """
  kernel_KxKxCxO = kernel_KxKxCxO.astype(x.dtype)
  if not planar:
    return _lax_conv(x, kernel_KxKxCxO)
  kh, kw = kernel_KxKxCxO.shape[:2]
  return _shifted_sum(x, kernel_KxKxCxO, _same_pads(kh), _same_pads(kw))


def _lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``lax.conv_general_dilated`` in ``x``'s dtype, the kernel rounded to
  it."""
  return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _same_pads(size: int) -> tuple[int, int]:
  """SAME padding ``(before, after)`` of a stride-1 kernel of ``size``."""
  return (size - 1) // 2, size // 2


def _shifted_planes(x_CxBxHxW: jax.Array, pad_h: tuple[int, int],
                    pad_w: tuple[int, int], kh: int, kw: int):
  """``((i, j), x padded by pad_h, pad_w and shifted by (i, j))``, each
  ``[channels, batch, height, width]``, for each tap of a ``kh x kw``
  kernel."""
  _, _, height, width = x_CxBxHxW.shape
  # Materialised: fused into the consumers' loops, the producers of x (a
  # gradient's selects, BatchNorm's affine map) would run once per tap (the
  # AV-MNIST step took 250 ms instead of 153 without this barrier, one core).
  padded = lax.optimization_barrier(
      jnp.pad(x_CxBxHxW, ((0, 0), (0, 0), pad_h, pad_w)))
  for i in range(kh):
    for j in range(kw):
      yield (i, j), padded[:, :, i:i + height, j:j + width]


def _shifted_sum(x_CxBxHxW: jax.Array, kernel_KxKxCxO: jax.Array,
                 pad_h: tuple[int, int], pad_w: tuple[int, int]) -> jax.Array:
  """The correlation of planar ``x`` (padded by ``pad_h``, ``pad_w``) with
  ``kernel``: ``out[o] = sum over i, j, c of kernel[i, j, c, o] * x[c]
  shifted by (i, j)``, ``[out, batch, height, width]``. One fused loop of
  ``k*k*in`` multiply-adds per output, vectorised along the width, summed in
  ``accumulation_dtype``; returned in ``x``'s dtype."""
  acc = accumulation_dtype(x_CxBxHxW.dtype)
  kh, kw, in_channels, _ = kernel_KxKxCxO.shape
  weights = kernel_KxKxCxO.astype(acc)[..., None, None, None]
  out = None
  for (i, j), shifted in _shifted_planes(x_CxBxHxW.astype(acc), pad_h, pad_w,
                                         kh, kw):
    for c in range(in_channels):
      term = shifted[c] * weights[i, j, c]  # [out, batch, height, width]
      out = term if out is None else out + term
  return out.astype(x_CxBxHxW.dtype)


def _conv_gradients(x: jax.Array, kernel: jax.Array, d_y: jax.Array,
                    planar: bool):
  """``(d_x, d_kernel)`` of ``conv_same`` for the output gradient ``d_y``
  (in ``accumulation_dtype``, in ``x``'s layout), in the dtypes of ``x`` and
  ``kernel``.

  Usual layout: XLA's gradients of the convolution, which take ``d_y``
  rounded to ``x``'s dtype. Planar: ``d_x`` is the shifted sum of ``d_y`` with
  the kernel flipped and its channels swapped; ``d_kernel[i, j, 0, o]`` of a
  one-channel input is the sum over batch and space of ``x`` shifted by
  ``(i, j)`` times ``d_y[o]``, all ``k*k`` sums in one variadic reduction
  that reads ``d_y`` once (alone, on AV-MNIST's 112x112 spectrograms at
  batch 40 on one core: 12-15 ms, against 20 for the same reduction in the
  usual layout and 26 for XLA's kernel gradient; ``d_y`` arrives
  materialised, see ``_computed_once``). A wider
  input's is XLA's, in the usual layout (a variadic reduction over
  ``k*k*in`` products took 18.5 ms against XLA's 10.6 on the second audio
  layer).
  """
  if not planar:
    _, conv_vjp = jax.vjp(_lax_conv, x, kernel)
    return conv_vjp(d_y.astype(x.dtype))
  kh, kw, in_channels, _ = kernel.shape
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3).astype(d_y.dtype)
  d_x = _shifted_sum(d_y, flipped, _same_pads(kh)[::-1],
                     _same_pads(kw)[::-1]).astype(x.dtype)
  if in_channels != 1:
    _, kernel_vjp = jax.vjp(lambda k: _lax_conv(from_planar(x), k), kernel)
    (d_kernel,) = kernel_vjp(from_planar(d_y).astype(x.dtype))
    return d_x, d_kernel
  products = tuple(shifted[0] * d_y for _, shifted in _shifted_planes(
      x.astype(d_y.dtype), _same_pads(kh), _same_pads(kw), kh, kw))
  sums = lax.reduce(products, (jnp.zeros((), d_y.dtype),) * len(products),
                    lambda a, b: tuple(u + v for u, v in zip(a, b)),
                    (1, 2, 3))
  d_kernel = jnp.stack(sums).reshape(kh, kw, 1, -1)
  return d_x, d_kernel.astype(kernel.dtype)


def _computed_once(x: jax.Array) -> jax.Array:
  """``x``, written to memory before the loops that read it run.

  XLA:CPU fuses an elementwise producer into each loop that reads it, so a
  planar block's output gradient (the pooling's scatter to the window's
  extreme and BatchNorm's statistics terms) would be recomputed inside the
  kernel gradient's reduction and the input gradient's shifted sum, at up
  to twice their cost; ``lax.optimization_barrier`` does not prevent that
  fusion (measured: the AV-MNIST step was as slow with it as without).
  The operand of a conditional is always materialised, so ``x`` passes
  through one whose branches both return it unchanged (one as ``x * 1.0``:
  XLA removes a conditional whose branches are the same computation, or
  whose predicate it can fold; the predicate is read at run time).
  ``tests/test_fused_conv.py`` checks that the compiled gradient keeps it.
  AV-MNIST's train step: 10-18% faster for late fusion (batch 40 and 256,
  one device and two) and 6-14% for tensor, low-rank and FiLM fusion.
  """
  return lax.cond(jnp.isfinite(x.reshape(-1)[0]), lambda a: a,
                  lambda a: a * 1.0, x)


# Layout helpers: usual [batch, height, width, channels] or planar
# [channels, batch, height, width].


def _per_channel(v_C: jax.Array, planar: bool) -> jax.Array:
  """A ``[channels]`` vector, shaped to broadcast against a feature map."""
  return v_C[:, None, None, None] if planar else v_C


def _non_channel_axes(planar: bool) -> tuple[int, int, int]:
  return (1, 2, 3) if planar else (0, 1, 2)


def _windows(y: jax.Array, planar: bool) -> jax.Array:
  """The 2x2 windows, dropping an odd last row or column (as
  ``image.max_pool_2x2``): ``[b, h, w, c] -> [b, h // 2, 2, w // 2, 2, c]``
  (planar: ``[c, b, h, w] -> [c, b, h // 2, 2, w // 2, 2]``)."""
  if planar:
    c, b, h, w = y.shape
    return y[:, :, :h // 2 * 2, :w // 2 * 2].reshape(c, b, h // 2, 2,
                                                      w // 2, 2)
  b, h, w, c = y.shape
  y = y[:, :h // 2 * 2, :w // 2 * 2]
  return y.reshape(b, h // 2, 2, w // 2, 2, c)


def _window_axes(planar: bool) -> tuple[int, int]:
  """The two within-window axes of ``_windows``."""
  return (3, 5) if planar else (2, 4)


def _corners(windows: jax.Array, planar: bool) -> list[jax.Array]:
  """The four pooled-size corners of ``_windows``'s 2x2 windows."""
  row, col = _window_axes(planar)
  return [lax.index_in_dim(lax.index_in_dim(windows, i, row, keepdims=False),
                           j, col - 1, keepdims=False)
          for i in (0, 1) for j in (0, 1)]


def _unpool(d_windows: jax.Array, shape: tuple[int, ...],
            planar: bool) -> jax.Array:
  """``_windows``'s inverse for gradients: back to ``shape``, zeros in a
  dropped last row or column."""
  if planar:
    c, b, h, w = shape
    flat = d_windows.reshape(c, b, h // 2 * 2, w // 2 * 2)
    return jnp.pad(flat, ((0, 0), (0, 0), (0, h % 2), (0, w % 2)))
  b, h, w, c = shape
  flat = d_windows.reshape(b, h // 2 * 2, w // 2 * 2, c)
  return jnp.pad(flat, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def _batch_stats(y: jax.Array, axis_name: str | None, planar: bool):
  """flax's fast variance: ``(E[y], E[y^2])`` over batch and space, in
  ``accumulation_dtype`` (as ``nn.BatchNorm``), averaged over
  ``axis_name``."""
  y = y.astype(accumulation_dtype(y.dtype))
  axes = _non_channel_axes(planar)
  mean, mean2 = y.mean(axes), jnp.square(y).mean(axes)
  if axis_name is not None:
    mean, mean2 = lax.pmean(jnp.stack([mean, mean2]), axis_name)
  return mean, mean2


def _pooled_extreme(y: jax.Array, mul: jax.Array, planar: bool) -> jax.Array:
  """Each 2x2 window's maximum of ``y`` where ``mul >= 0``, else its minimum:
  the ``y`` at which ``(y - mean) * mul + bias`` is largest. (Elementwise
  maxima of the corners: XLA:CPU reduces windows several times slower.)"""
  sign = _per_channel(jnp.where(mul >= 0, 1.0, -1.0).astype(y.dtype), planar)
  corners = _corners(_windows(y * sign, planar), planar)
  return sign * functools.reduce(jnp.maximum, corners)


def _normalize_relu(extreme: jax.Array, mean: jax.Array, mul: jax.Array,
                    bias: jax.Array, planar: bool) -> jax.Array:
  """BatchNorm's affine map ``(extreme - mean) * mul + bias`` and ReLU, in
  the statistics' dtype."""
  per_channel = functools.partial(_per_channel, planar=planar)
  return jax.nn.relu((extreme - per_channel(mean)) * per_channel(mul) +
                     per_channel(bias))


def normalize_relu_pool(y: jax.Array, mean: jax.Array, var: jax.Array,
                        scale: jax.Array, bias: jax.Array,
                        planar: bool = False) -> jax.Array:
  """``max_pool_2x2(relu(BatchNorm(y)))`` with the given statistics, pooled
  first: ``[b, h, w, c] -> [b, h // 2, w // 2, c]`` (planar: ``[c, b, h, w]
  -> [c, b, h // 2, w // 2]``) in ``y``'s dtype (the affine map in the
  statistics' float32, as ``nn.BatchNorm``)."""
  mul = lax.rsqrt(var + BN_EPSILON) * scale
  extreme = _pooled_extreme(y, mul, planar)
  return _normalize_relu(extreme, mean, mul, bias, planar).astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def conv_bn_relu_pool(x, kernel, scale, bias, axis_name=None, planar=False):
  """Convolution, BatchNorm with batch statistics, ReLU and 2x2 max-pool.

  Args:
    x: ``[batch, height, width, in]`` (planar: ``[in, batch, height,
      width]``), in the compute dtype.
    kernel: ``[k, k, in, out]``, SAME padding; rounded to ``x``'s dtype.
    scale, bias: BatchNorm's ``[out]`` parameters.
    axis_name: the data-parallel axis over which the statistics are averaged
      (as ``nn.BatchNorm(axis_name=...)``), or None.
    planar: whether ``x`` and the output are in the planar layout.

  Returns:
    ``(out, mean [out], var [out])``: the block's output ``[batch, height //
    2, width // 2, out]`` (planar: ``[out, batch, height // 2, width //
    2]``) in ``x``'s dtype and the batch statistics in
    ``accumulation_dtype``, for the running averages.
  """
  out, mean, var, _ = _forward(x, kernel, scale, bias, axis_name, planar)
  return out, mean, var


def _forward(x, kernel, scale, bias, axis_name, planar):
  y = conv_same(x, kernel, planar)
  mean, mean2 = _batch_stats(y, axis_name, planar)
  var = jnp.maximum(0.0, mean2 - jnp.square(mean))
  mul = lax.rsqrt(var + BN_EPSILON) * scale
  extreme = _pooled_extreme(y, mul, planar)
  out = _normalize_relu(extreme, mean, mul, bias, planar).astype(y.dtype)
  residuals = (x, kernel, scale, bias, y, extreme, mean, mean2, var)
  return out, mean, var, residuals


def _forward_rule(x, kernel, scale, bias, axis_name, planar):
  out, mean, var, residuals = _forward(x, kernel, scale, bias, axis_name,
                                       planar)
  return (out, mean, var), residuals


def _backward_rule(axis_name, planar, residuals, cotangents):
  x, kernel, scale, bias, y, extreme, mean, mean2, var = residuals
  d_out, d_mean_out, d_var_out = cotangents
  d_out = d_out.astype(mean.dtype)  # From here on, in accumulation_dtype.
  per_channel = functools.partial(_per_channel, planar=planar)
  sum_per_channel = lambda a: a.sum(_non_channel_axes(planar))
  inv_std = lax.rsqrt(var + BN_EPSILON)
  mul = inv_std * scale
  centered = extreme - per_channel(mean)
  # Through ReLU and the affine map, at the pooled resolution.
  d_z = jnp.where(centered * per_channel(mul) + per_channel(bias) > 0, d_out,
                  0.0)
  d_bias = sum_per_channel(d_z)
  d_mul = sum_per_channel(d_z * centered)
  d_extreme = d_z * per_channel(mul)
  # mul = scale / sqrt(var + eps); var = max(0, E[y^2] - E[y]^2).
  d_scale = d_mul * inv_std
  d_var = d_mul * scale * -0.5 * inv_std**3 + d_var_out
  d_mean2 = jnp.where(mean2 - jnp.square(mean) > 0, d_var, 0.0)
  d_mean = -d_bias * mul + d_mean_out - 2.0 * mean * d_mean2
  if axis_name is not None:  # The transpose of the statistics' pmean.
    d_mean, d_mean2 = lax.pmean(jnp.stack([d_mean, d_mean2]), axis_name)
  count = y.size // y.shape[0 if planar else -1]
  # Each window's gradient goes to its extreme positions, split between ties.
  windows = _windows(y, planar)
  window_axes = _window_axes(planar)
  ties = sum((corner == extreme).astype(y.dtype)
             for corner in _corners(windows, planar))
  at_extreme = windows == jnp.expand_dims(extreme, window_axes)
  d_windows = jnp.where(at_extreme,
                        jnp.expand_dims(d_extreme / ties, window_axes), 0.0)
  d_y = _unpool(d_windows, y.shape, planar) + (
      per_channel(d_mean) + 2.0 * y * per_channel(d_mean2)) / count
  if planar:  # Read by k*k*out taps of d_x and k*k of d_kernel.
    d_y = _computed_once(d_y)
  d_x, d_kernel = _conv_gradients(x, kernel, d_y, planar)
  # Each cotangent in its primal's dtype, as custom_vjp requires.
  return d_x, d_kernel, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


conv_bn_relu_pool.defvjp(_forward_rule, _backward_rule)
