"""The encoder contract: what every encoder takes and returns.

An encoder turns one modality's batch into an ``Encoding``. Every registered
encoder (``mmjax.registry.ENCODERS``) subclasses ``Encoder`` and is called as

    encoder(x, mask=None, *, train) -> Encoding

* ``x``: the modality's batch, ``[batch, ...]``; each encoder states its own
  shape (images ``[batch, height, width, channels]``, token ids ``[batch,
  time]``, ...).
* ``mask``: ``[batch, time]`` bool, True on real steps and False on padding;
  ``None`` when every step is real. Padding follows the real steps (right
  padding, as the ``tokenize`` op writes it), and a row may have no real step
  (an empty sequence). Encoders of inputs that are never padded (images,
  vectors) accept and ignore the mask, so that every encoder has one
  signature. No value at a padded step may reach ``pooled``.
* ``train``: training mode: BatchNorm normalises with (and updates) batch
  statistics and dropout is on; otherwise running statistics and no dropout.

The ``Encoding`` it returns:

* ``pooled``: ``[batch, dim]``, one vector per example; what fusions of
  pooled vectors read.
* ``tokens``: the features before pooling: a feature map ``[batch, height,
  width, channels]`` or a sequence ``[batch, time, dim]``; ``None`` where an
  encoder has no token view. What attention fusions and FiLM's target read.
* ``mask``: ``[batch, time]`` bool for sequence tokens, True on real tokens;
  ``None`` when every token is real.

Pooled projections. An encoder whose ``pooled`` ends with a learned
projection of the tokens (e.g. ``cnn``'s ``Dense``) that can be left out
names the field that sizes it in the class attribute ``pooled_projection``;
that field set to 0 means no projection: ``pooled`` is then a
parameter-free pooling of the tokens. ``mmjax.models.build_model`` builds the
encoder of a modality that the fusion reads as tokens only
(``mmjax.fusion.base.Fusion.token_modalities``) with
``without_pooled_projection()``, so that no encoder parameter is left
without a gradient.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import flax.linen as nn
import flax.struct
import jax


@flax.struct.dataclass
class Encoding:
  """One modality's encoding: ``pooled [batch, dim]``, ``tokens`` (or
  ``None``) and ``mask`` (or ``None``), as the module docstring defines them.
  """
  pooled: jax.Array
  tokens: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None


class Encoder(nn.Module):
  """The base of every encoder; see the module docstring for the contract.

  Attributes:
    pooled_projection: (class attribute) the name of the integer field that
      sizes ``pooled``'s learned projection, 0 meaning none; ``None`` (the
      default) where ``pooled`` has no projection that can be left out.
  """
  pooled_projection: ClassVar[Optional[str]] = None

  @nn.nowrap
  def without_pooled_projection(self) -> Encoder:
    """This encoder with its pooled projection switched off (its
    ``pooled_projection`` field set to 0); itself if it has none."""
    if self.pooled_projection is None:
      return self
    return self.clone(**{self.pooled_projection: 0})
