"""Input checks shared by the fusion blocks: each names the block, the
modality and the shapes, and says what to use instead where it can."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.transformer import as_sequence


def in_sorted_order(encodings: dict[str, Encoding]) -> dict[str, Encoding]:
  """``encodings`` with its modalities sorted by name.

  Every fusion block reads its modalities in this order wherever order
  matters (concatenation, outer products, which modality is gated):
  ``jax.jit`` rebuilds a dict argument with sorted keys, so a block that
  followed the dict's own order would compute a different function of the
  same parameters inside and outside ``jit`` (``tests/test_modality_order.py``).
  """
  return dict(sorted(encodings.items()))


def check_pooled(encodings: dict[str, Encoding], block: str) -> None:
  """Raises ``ValueError`` unless every ``pooled`` is ``[batch, dim]`` with one
  shared batch size. ``block`` names the caller in the message."""
  shapes = {name: enc.pooled.shape for name, enc in encodings.items()}
  for name, shape in shapes.items():
    if len(shape) != 2:
      raise ValueError(
          f"{block} modality {name!r} needs pooled of shape [batch, dim]; "
          f"got {shape}.")
  if len({shape[0] for shape in shapes.values()}) > 1:
    raise ValueError(
        f"{block} modalities disagree on batch size; pooled shapes: {shapes}.")


def check_multimodal(encodings: dict[str, Encoding], block: str) -> None:
  """Raises ``ValueError`` unless there are at least two modalities, each with
  ``pooled [batch, dim]`` and one shared batch size."""
  if len(encodings) < 2:
    raise ValueError(
        f"{block} fusion needs at least two modalities; got "
        f"{list(encodings)}. Use fusion 'concat' for unimodal baselines.")
  check_pooled(encodings, block)


def token_sequences(
    encodings: dict[str, Encoding], block: str
) -> dict[str, tuple[jax.Array, Optional[jax.Array]]]:
  """Each modality's tokens as a sequence, for the attention fusions.

  Feature maps ``[batch, h, w, c]`` are flattened (row-major) to ``[batch,
  h*w, c]``; sequences ``[batch, time, dim]`` pass through. Padded positions
  are set to zero, so that no value there can reach a fusion's output, even
  through a sequence with no real token (whose attention has no real key).

  The result is in sorted modality order (``in_sorted_order``), whatever the
  order of ``encodings``.

  Args:
    encodings: modality -> ``Encoding`` with ``tokens`` and optional ``mask``.
    block: the caller, named in error messages.

  Returns:
    modality -> ``(tokens [batch, tokens_m, dim_m], mask [batch, tokens_m]
    bool or None)``, sorted by modality name.
  """
  sequences = {}
  for name, enc in in_sorted_order(encodings).items():
    if enc.tokens is None:
      raise ValueError(
          f"{block} fusion reads every modality's tokens, but the encoder of "
          f"modality {name!r} gave none (tokens=None). Use an encoder with "
          "tokens (e.g. cnn, vit, lstm, text_transformer) or a fusion of "
          "pooled vectors (e.g. concat).")
    if enc.tokens.ndim not in (3, 4):
      raise ValueError(
          f"{block} modality {name!r} needs tokens of shape [batch, h, w, c] "
          f"or [batch, time, dim]; got {enc.tokens.shape}.")
    x_BxNxD = as_sequence(enc.tokens)
    mask_BxN = enc.mask
    if mask_BxN is not None:
      if mask_BxN.shape != x_BxNxD.shape[:2]:
        raise ValueError(
            f"{block} modality {name!r} has tokens {enc.tokens.shape} but "
            f"mask {mask_BxN.shape}; the mask must be [batch, tokens].")
      mask_BxN = mask_BxN.astype(bool)
      x_BxNxD = jnp.where(mask_BxN[..., None], x_BxNxD, 0.)
    sequences[name] = (x_BxNxD, mask_BxN)
  shapes = {name: x.shape for name, (x, _) in sequences.items()}
  if len({shape[0] for shape in shapes.values()}) > 1:
    raise ValueError(f"{block} modalities disagree on batch size; token "
                     f"sequence shapes: {shapes}.")
  return sequences
