"""Encoders, one per kind of modality; importing this registers them."""

from mmjax.encoders import image
from mmjax.encoders import text
from mmjax.encoders.base import Encoding

__all__ = ["Encoding", "image", "text"]
