"""Fusion blocks; importing this registers them."""

from mmjax.fusion import concat
from mmjax.fusion import film

__all__ = ["concat", "film"]
