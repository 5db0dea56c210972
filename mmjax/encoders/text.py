"""Encoders for token sequences: LSTM, GRU, deep averaging network and
transformer. Each takes ``[batch, time]`` int token ids."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoder, Encoding
from mmjax.registry import ENCODERS
from mmjax.transformer import PositionEmbedding, Transformer, masked_mean


def _check_tokens(name: str, x: jax.Array, mask: jax.Array | None
                  ) -> jax.Array | None:
  """Validates ``[batch, time]`` ids and mask; returns the mask as bool."""
  if x.ndim != 2:
    raise ValueError(
        f"{name} needs token ids of shape [batch, time]; got {x.shape}.")
  if mask is None:
    return None
  if mask.shape != x.shape:
    raise ValueError(f"{name} mask shape {mask.shape} does not match token "
                     f"ids shape {x.shape}.")
  return mask.astype(bool)


class RNNEncoder(Encoder):
  """Token embedding followed by a unidirectional recurrent network.

  The shared body of ``LSTMEncoder`` and ``GRUEncoder``, which differ only in
  the cell that ``make_cell`` returns.

  Padding is ignored: the recurrence is told each sequence's length,
  ``pooled`` is the hidden state after the last real token, and padded
  positions of ``tokens`` are zero. Because the recurrence runs left to right,
  real positions never see the padding that follows them. This relies on
  *right* padding (all real tokens before all padding), which is what
  ``mask.sum(-1)`` as the sequence length assumes.

  In a ``dtype`` other than float32 the cell's matmuls run in ``dtype`` but
  its recurrent state stays float32 (flax's cells keep the carry in the
  parameters' dtype), so rounding does not compound over the time steps;
  ``pooled`` and ``tokens`` are cast to ``dtype``.

  Attributes:
    vocab_size: number of token ids.
    embed_dim: width of the token embedding.
    hidden: recurrent state width, and the width of ``pooled`` and ``tokens``.
    dtype: compute dtype; parameters stay float32.
  """
  vocab_size: int
  embed_dim: int = 64
  hidden: int = 128
  dtype: Any = jnp.float32

  def make_cell(self) -> nn.RNNCellBase:
    """The recurrent cell, of width ``hidden``, computing in ``dtype``."""
    raise NotImplementedError(
        f"{type(self).__name__} must define make_cell().")

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Token ids ``[batch, time]`` -> ``pooled [batch, hidden]`` (all zeros
    for an empty sequence), ``tokens [batch, time, hidden]`` zeroed at
    padding, and ``mask [batch, time]`` (all True if the input's was None).
    ``train`` changes nothing: there is no dropout or BatchNorm."""
    del train
    mask = _check_tokens(type(self).__name__, x, mask)
    if mask is None:
      mask = jnp.ones(x.shape, bool)
    lengths_B = mask.sum(-1)
    x_BxTxE = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)(x)
    y_BxTxH = nn.RNN(self.make_cell())(x_BxTxE, seq_lengths=lengths_B)
    y_BxTxH = y_BxTxH.astype(self.dtype)  # From the float32 state.
    # The output at the last real token is the hidden state there, for either
    # cell. An empty sequence has none: its pooled vector is zeroed, so that
    # empty inputs carry no information.
    last_Bx1x1 = jnp.maximum(lengths_B - 1, 0)[:, None, None]
    h_BxH = jnp.take_along_axis(y_BxTxH, last_Bx1x1, axis=1)[:, 0]
    pooled = jnp.where(lengths_B[:, None] > 0, h_BxH, 0.)
    tokens = jnp.where(mask[..., None], y_BxTxH, 0.)
    return Encoding(pooled=pooled, tokens=tokens, mask=mask)


@ENCODERS.register("lstm")
class LSTMEncoder(RNNEncoder):
  """``RNNEncoder`` with an LSTM cell.

  Hochreiter & Schmidhuber, 1997, "Long Short-Term Memory".
  """

  def make_cell(self) -> nn.RNNCellBase:
    return nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype)


@ENCODERS.register("gru")
class GRUEncoder(RNNEncoder):
  """``RNNEncoder`` with a GRU cell.

  Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder
  for Statistical Machine Translation", arXiv:1406.1078.
  """

  def make_cell(self) -> nn.RNNCellBase:
    return nn.GRUCell(self.hidden, dtype=self.dtype)


@ENCODERS.register("dan")
class DANEncoder(Encoder):
  """Deep averaging network: the mean word embedding through a ReLU MLP.

  Iyyer et al. 2015, "Deep Unordered Composition Rivals Syntactic Methods for
  Text Classification", ACL. Word order is ignored; the average runs over
  real tokens only. Every layer, the last included, is ``Dense`` then ReLU,
  as in the paper. (The paper's word dropout is not implemented.)

  Attributes:
    vocab_size: number of token ids.
    embed_dim: width of the token embedding.
    hidden: widths of the hidden layers between the average and ``pooled``.
    dim: width of ``pooled``.
    dtype: compute dtype; parameters stay float32.
  """
  vocab_size: int
  embed_dim: int = 64
  hidden: tuple[int, ...] = (128,)
  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Token ids ``[batch, time]`` -> ``pooled [batch, dim]``, ``tokens``
    the embeddings ``[batch, time, embed_dim]`` zeroed at padding, and the
    input ``mask``. ``train`` changes nothing: there is no dropout or
    BatchNorm."""
    del train
    mask = _check_tokens("DANEncoder", x, mask)
    x_BxTxE = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)(x)
    if mask is not None:
      x_BxTxE = jnp.where(mask[..., None], x_BxTxE, 0.)
    y = masked_mean(x_BxTxE, mask)
    for width in (*self.hidden, self.dim):
      y = nn.relu(nn.Dense(width, dtype=self.dtype)(y))
    return Encoding(pooled=y, tokens=x_BxTxE, mask=mask)


@ENCODERS.register("text_transformer")
class TextTransformerEncoder(Encoder):
  """Token embedding, learned positions and a pre-LN transformer encoder.

  Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762, with
  the pre-LN layers of ``mmjax.transformer``. Padded tokens are masked out as
  attention keys, so real tokens never see them, and ``pooled`` is the mean
  over real tokens.

  Attributes:
    vocab_size: number of token ids.
    dim: width of the embedding, every layer, ``pooled`` and ``tokens``.
    num_layers: transformer depth.
    num_heads: attention heads; must divide ``dim``.
    mlp_dim: hidden width of each layer's MLP.
    dropout: dropout rate on the embeddings, attention and residual branches.
    max_len: the longest sequence accepted (rows of the position table).
    dtype: compute dtype; parameters stay float32.
  """
  vocab_size: int
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  max_len: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Token ids ``[batch, time]``, ``time <= max_len`` -> ``pooled [batch,
    dim]`` (the mean of ``tokens`` over real tokens; zeros for an empty
    sequence), ``tokens [batch, time, dim]`` and the input ``mask``."""
    mask = _check_tokens("TextTransformerEncoder", x, mask)
    y_BxTxD = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype)(x)
    y_BxTxD = PositionEmbedding(self.max_len, dtype=self.dtype)(y_BxTxD)
    y_BxTxD = nn.Dropout(self.dropout, deterministic=not train)(y_BxTxD)
    y_BxTxD = Transformer(self.num_layers, self.num_heads, self.mlp_dim,
                          self.dropout, dtype=self.dtype)(y_BxTxD, mask,
                                                          train=train)
    return Encoding(pooled=masked_mean(y_BxTxD, mask), tokens=y_BxTxD,
                    mask=mask)
