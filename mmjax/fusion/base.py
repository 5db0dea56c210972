"""The fusion contract, and the input checks shared by the fusion blocks.

A fusion block combines the encodings of the fused modalities. Every
registered block (``mmjax.registry.FUSIONS``) subclasses ``Fusion`` and is
called as

    fusion(encodings, *, train) -> features

* ``encodings``: ``{modality: Encoding}`` (``mmjax.encoders.base`` defines
  ``pooled``, ``tokens`` and ``mask``), one entry per fused modality.
* ``train``: training mode (dropout, BatchNorm batch statistics).
* ``features``: ``[batch, dim]``, which every head reads. Decision-level
  fusion (``decision``) returns ``{modality: [batch, dim]}`` instead, in
  sorted modality order, and the model applies each head to each modality's
  features (``mmjax.models``).

Modality order. A block reads its modalities in sorted name order wherever
order matters (concatenation, outer products, which modality plays which
role; ``in_sorted_order``), and names per-modality parameters after the
modality (``proj_<modality>``), never after a position: ``jax.jit``
rebuilds a dict argument with sorted keys, so a block that followed the
dict's own order would compute a different function of the same parameters
inside and outside ``jit`` (``tests/test_modality_order.py``).

What a block reads. By default a block reads each modality's ``pooled``
vector. A block that reads some modalities' ``tokens`` and never their
``pooled`` declares them in ``token_modalities``; ``build_model`` then builds
their encoders without a pooled projection
(``Encoder.without_pooled_projection``), which would get no gradient.

Errors. A block checks its inputs before it builds a layer and raises
``ValueError`` naming itself, the modality and the shapes, and what to use
instead where it can (the checks below; ``mmjax.fusion.tokens`` for tokens).
"""

from __future__ import annotations

from typing import Iterable

import flax.linen as nn

from mmjax.encoders.base import Encoding


class Fusion(nn.Module):
  """The base of every fusion block; see the module docstring."""

  @nn.nowrap
  def token_modalities(self, modalities: Iterable[str]) -> frozenset[str]:
    """Those of ``modalities`` whose ``tokens`` alone this block reads, never
    their ``pooled``: none by default."""
    del modalities
    return frozenset()


def in_sorted_order(encodings: dict[str, Encoding]) -> dict[str, Encoding]:
  """``encodings`` with its modalities sorted by name."""
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
