"""Input checks shared by the fusion blocks: each names the block, the
modality and the shapes, and says what to use instead where it can."""

from __future__ import annotations

from mmjax.encoders.base import Encoding


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
