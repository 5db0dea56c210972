"""What every encoder returns."""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax


@flax.struct.dataclass
class Encoding:
  """One modality's encoding.

  Attributes:
    pooled: ``[batch, dim]`` summary vector, used by late fusion.
    tokens: the unpooled features, ``[batch, height, width, channels]`` for
      images and spectrograms or ``[batch, time, dim]`` for sequences; ``None``
      where an encoder has no meaningful token view.
    mask: ``[batch, time]`` bool, True on real (non-padding) tokens; ``None``
      when every token is real.
  """
  pooled: jax.Array
  tokens: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None
