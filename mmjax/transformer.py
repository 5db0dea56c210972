"""Transformer layers shared by the attention encoders and fusion blocks.

Pre-LayerNorm layers (Xiong et al. 2020, arXiv:2002.04745), as in ViT
(Dosovitskiy et al. 2021, arXiv:2010.11929) and MBT (Nagrani et al. 2021,
arXiv:2107.00135). Every attention takes a key mask ``[batch, keys]`` (True on
real tokens), so padded tokens are never attended to; outputs at padded
positions are computed but carry no information into real ones.

In any compute dtype (``dtype``), LayerNorm reduces in float32 (flax's
default) and the attention softmax runs in float32
(``attention_float32_softmax``).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def key_mask(mask_BxK: Optional[jax.Array]) -> Optional[jax.Array]:
  """``[batch, keys]`` bool -> the ``[batch, 1, 1, keys]`` attention mask."""
  return None if mask_BxK is None else mask_BxK[:, None, None, :]


def masked_mean(x_BxNxD: jax.Array, mask_BxN: Optional[jax.Array]) -> jax.Array:
  """Mean over the real tokens, ``[batch, tokens, dim] -> [batch, dim]``; all
  zeros for a sequence with no real token."""
  if mask_BxN is None:
    return x_BxNxD.mean(axis=1)
  weights = mask_BxN.astype(x_BxNxD.dtype)[..., None]
  return (x_BxNxD * weights).sum(1) / jnp.maximum(weights.sum(1), 1.)


def attention_float32_softmax(query: jax.Array, key: jax.Array,
                              value: jax.Array,
                              mask: Optional[jax.Array] = None, *,
                              dropout_rng: Optional[jax.Array] = None,
                              dropout_rate: float = 0.0,
                              broadcast_dropout: bool = True,
                              deterministic: bool = True,
                              dtype: Any = None) -> jax.Array:
  """``nn.dot_product_attention`` with its softmax in float32.

  ``query [batch, queries, heads, d]``, ``key`` and ``value [batch, keys,
  heads, d]`` -> ``[batch, queries, heads, d]``. Both matmuls (logits, and
  the weighted sum of values) run in ``dtype``; the softmax over the keys
  runs in float32 and its weights are cast back to ``dtype``. (flax's own
  ``force_fp32_for_softmax`` leaves the weights in float32, which turns the
  second matmul into a float32 one.) In float32 this is
  ``nn.dot_product_attention``.
  """
  weights = nn.dot_product_attention_weights(
      query, key, mask=mask, broadcast_dropout=broadcast_dropout,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate,
      deterministic=deterministic, dtype=dtype, force_fp32_for_softmax=True)
  return jnp.einsum("...hqk,...khd->...qhd", weights.astype(value.dtype),
                    value)


class MlpBlock(nn.Module):
  """``Dense(mlp_dim) -> GELU -> dropout -> Dense(dim)`` on ``[..., dim]``;
  ``dtype`` is the compute dtype, parameters stay float32."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dim = x.shape[-1]
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.Dense(dim, dtype=self.dtype)(y)


class TransformerLayer(nn.Module):
  """One pre-LN layer: ``x + Attn(LN(x), context) ; x + MLP(LN(x))``.

  Self-attention when ``context`` is None; otherwise cross-attention from the
  queries ``x`` to ``context`` (MulT's cross-modal layer, Tsai et al. 2019,
  arXiv:1906.00295, which normalises the context with its own LayerNorm).

  Attributes:
    num_heads: attention heads; must divide the width of ``x``.
    mlp_dim: hidden width of the MLP.
    dropout: dropout rate on the attention weights and residual branches.
    dtype: compute dtype; parameters stay float32.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, mask_BxN: Optional[jax.Array] = None,
               *, context_BxMxE: Optional[jax.Array] = None,
               context_mask_BxM: Optional[jax.Array] = None,
               train: bool) -> jax.Array:
    """``x [batch, queries, dim]`` -> ``[batch, queries, dim]``.

    Args:
      x_BxNxD: the query tokens.
      mask_BxN: True on real query tokens; the key mask for self-attention.
      context_BxMxE: tokens to attend to instead of ``x`` (cross-attention).
      context_mask_BxM: True on real context tokens.
      train: enables dropout.
    """
    dim = x_BxNxD.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"TransformerLayer width {dim} is not divisible by "
                       f"num_heads={self.num_heads}.")
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attention")(x_BxNxD)
    if context_BxMxE is None:
      kv, mask = y, key_mask(mask_BxN)
    else:
      kv, mask = nn.LayerNorm(dtype=self.dtype, name="ln_context")(
          context_BxMxE), key_mask(context_mask_BxM)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout,
        deterministic=not train, dtype=self.dtype,
        attention_fn=attention_float32_softmax, name="attention")(
            y, kv, mask=mask)
    x_BxNxD = x_BxNxD + drop(y)
    y = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, name="mlp")(
        nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x_BxNxD), train=train)
    return x_BxNxD + drop(y)


class Transformer(nn.Module):
  """``num_layers`` self-attention layers and a final LayerNorm.

  Attributes:
    num_layers: depth.
    num_heads: attention heads per layer.
    mlp_dim: MLP hidden width.
    dropout: dropout rate.
    dtype: compute dtype; parameters stay float32.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, mask_BxN: Optional[jax.Array] = None,
               *, train: bool) -> jax.Array:
    """``[batch, tokens, dim] -> [batch, tokens, dim]``."""
    for i in range(self.num_layers):
      x_BxNxD = TransformerLayer(self.num_heads, self.mlp_dim, self.dropout,
                                 dtype=self.dtype, name=f"layer_{i}")(
                                     x_BxNxD, mask_BxN, train=train)
    return nn.LayerNorm(dtype=self.dtype, name="ln_out")(x_BxNxD)


class PositionEmbedding(nn.Module):
  """Adds a learned position embedding to ``[batch, tokens, dim]``.

  Attributes:
    max_len: the most tokens it accepts.
    dtype: compute dtype (of the sum); parameters stay float32.
  """
  max_len: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
    n, dim = x_BxNxD.shape[1:]
    if n > self.max_len:
      raise ValueError(f"PositionEmbedding got {n} tokens; max_len is "
                       f"{self.max_len}. Raise max_len in the config.")
    table = self.param("embedding", nn.initializers.normal(0.02),
                       (self.max_len, dim))
    x_BxNxD, table_1xNxD = nn.dtypes.promote_dtype(
        x_BxNxD, table[None, :n], dtype=self.dtype)
    return x_BxNxD + table_1xNxD


def posemb_sincos_2d(height: int, width: int, dim: int,
                     temperature: float = 10_000.) -> jax.Array:
  """Fixed 2-D sin-cos position code of a ``height x width`` grid, flattened
  row-major as ``as_sequence`` flattens a feature map: ``[height * width,
  dim]``, float32.

  big_vision's ``posemb_sincos_2d`` (the position embedding of Chen, Xie & He
  2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
  arXiv:2104.02057, and of Beyer, Zhai & Kolesnikov 2022, "Better plain ViT
  baselines for ImageNet-1k", arXiv:2205.01580): a quarter of the features
  each are ``sin(x w_k)``, ``cos(x w_k)``, ``sin(y w_k)`` and ``cos(y w_k)``
  for column ``x``, row ``y`` and ``dim / 4`` frequencies ``w_k`` from 1 down
  to ``1 / temperature``, geometrically spaced. Every feature lies in [-1,
  1]: the code is of the order of unit-scale token features, not small next
  to them.
  """
  if dim % 4:
    raise ValueError(f"posemb_sincos_2d needs a width divisible by 4; got "
                     f"dim={dim}.")
  quarter = dim // 4
  omega_K = 1. / temperature**(jnp.arange(quarter) / max(quarter - 1, 1))
  y_HxW, x_HxW = jnp.mgrid[:height, :width]
  y_NxK = y_HxW.reshape(-1, 1) * omega_K[None]
  x_NxK = x_HxW.reshape(-1, 1) * omega_K[None]
  return jnp.concatenate([jnp.sin(x_NxK), jnp.cos(x_NxK), jnp.sin(y_NxK),
                          jnp.cos(y_NxK)], axis=1).astype(jnp.float32)


def as_sequence(tokens: jax.Array) -> jax.Array:
  """Flattens a feature map ``[batch, h, w, c]`` to ``[batch, h*w, c]``;
  passes ``[batch, time, dim]`` through."""
  if tokens.ndim == 4:
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
  if tokens.ndim != 3:
    raise ValueError("Expected tokens [batch, h, w, c] or [batch, time, dim]; "
                     f"got {tokens.shape}.")
  return tokens
