"""An LSTM encoder for token sequences."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.registry import ENCODERS


@ENCODERS.register("lstm")
class LSTMEncoder(nn.Module):
  """Token embedding followed by a unidirectional LSTM.

  Hochreiter & Schmidhuber, 1997, "Long Short-Term Memory".

  Padding is ignored: the LSTM is told each sequence's length, ``pooled`` is
  the hidden state after the last real token, and padded positions of
  ``tokens`` are zero. Because the LSTM runs left to right, real positions
  never see the padding that follows them. This relies on *right* padding
  (all real tokens before all padding), which is what ``mask.sum(-1)`` as the
  sequence length assumes.

  Attributes:
    vocab_size: number of token ids.
    embed_dim: width of the token embedding.
    hidden: LSTM state width, and the width of ``pooled`` and ``tokens``.
  """
  vocab_size: int
  embed_dim: int = 64
  hidden: int = 128

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Encodes a batch of right-padded token sequences.

    Args:
      x: ``[batch, time]`` int token ids.
      mask: ``[batch, time]`` bool, True on real tokens; None if all are real.
      train: unused (no dropout or BatchNorm); kept for a uniform signature.

    Returns:
      ``Encoding`` with ``pooled [batch, hidden]`` (all zeros for an empty
      sequence), ``tokens [batch, time, hidden]`` zeroed at padding, and
      ``mask [batch, time]`` (the input mask, all True if it was None).
    """
    del train
    if x.ndim != 2:
      raise ValueError(
          "LSTMEncoder needs token ids of shape [batch, time]; "
          f"got {x.shape}.")
    if mask is None:
      mask = jnp.ones(x.shape, bool)
    elif mask.shape != x.shape:
      raise ValueError(
          f"LSTMEncoder mask shape {mask.shape} does not match token ids "
          f"shape {x.shape}.")
    mask = mask.astype(bool)
    lengths_B = mask.sum(-1)
    x_BxTxE = nn.Embed(self.vocab_size, self.embed_dim)(x)
    (_, h_BxH), y_BxTxH = nn.RNN(
        nn.OptimizedLSTMCell(self.hidden), return_carry=True)(
            x_BxTxE, seq_lengths=lengths_B)
    # For an empty sequence, flax picks the carry at index -1 (the last padded
    # step); zero it so that empty inputs carry no information.
    pooled = jnp.where(lengths_B[:, None] > 0, h_BxH, 0.)
    tokens = jnp.where(mask[..., None], y_BxTxH, 0.)
    return Encoding(pooled=pooled, tokens=tokens, mask=mask)
