"""Fusion blocks; importing this registers them."""

from mmjax.fusion import concat
from mmjax.fusion import film
from mmjax.fusion import gated
from mmjax.fusion import multiplicative
from mmjax.fusion import tensor

__all__ = ["concat", "film", "gated", "multiplicative", "tensor"]
