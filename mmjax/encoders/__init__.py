"""Encoders, one per kind of modality; importing this registers them.

What every encoder takes and returns is in ``mmjax.encoders.base``.
"""

from mmjax.encoders import image
from mmjax.encoders import resnet
from mmjax.encoders import sequence
from mmjax.encoders import text
from mmjax.encoders import vit
from mmjax.encoders.base import Encoder, Encoding

__all__ = ["Encoder", "Encoding", "image", "resnet", "sequence", "text", "vit"]
