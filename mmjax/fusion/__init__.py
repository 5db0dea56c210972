"""Fusion blocks; importing this registers them.

What every block takes and returns is in ``mmjax.fusion.base``; the token
helpers of the attention blocks are in ``mmjax.fusion.tokens``.
"""

from mmjax.fusion import attention
from mmjax.fusion import bilinear
from mmjax.fusion import concat
from mmjax.fusion import crossmodal
from mmjax.fusion import decision
from mmjax.fusion import film
from mmjax.fusion import gated
from mmjax.fusion import multiplicative
from mmjax.fusion import tensor

__all__ = ["attention", "bilinear", "concat", "crossmodal", "decision", "film",
           "gated", "multiplicative", "tensor"]
