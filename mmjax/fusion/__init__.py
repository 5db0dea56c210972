"""Fusion blocks; importing this registers them."""

from mmjax.fusion import attention
from mmjax.fusion import bilinear
from mmjax.fusion import concat
from mmjax.fusion import decision
from mmjax.fusion import film
from mmjax.fusion import gated
from mmjax.fusion import multiplicative
from mmjax.fusion import mult
from mmjax.fusion import tensor

__all__ = ["attention", "bilinear", "concat", "decision", "film", "gated",
           "multiplicative", "mult", "tensor"]
