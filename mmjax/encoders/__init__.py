"""Encoders, one per kind of modality; importing this registers them."""

from mmjax.encoders import image
from mmjax.encoders import resnet
from mmjax.encoders import sequence
from mmjax.encoders import text
from mmjax.encoders import vit
from mmjax.encoders.base import Encoding

__all__ = ["Encoding", "image", "resnet", "sequence", "text", "vit"]
