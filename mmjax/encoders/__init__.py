"""Encoders, one per kind of modality; importing this registers them.

What every encoder takes and returns is in ``mmjax.encoders.base``. The
registered encoders, by file (``tests/test_block_contracts.py`` checks that
this table lists exactly the registered names, with their files and
classes):

  name              class                   paper
  image.py:
  cnn               ConvEncoder             Springenberg 2015, arXiv:1412.6806
  lenet             LeNetEncoder            LeCun 1998; MultiBench's variant
  resnet.py:
  resnet            ResNetEncoder           He 2016, arXiv:1512.03385
  vit.py:
  vit               ViTEncoder              Dosovitskiy 2021, arXiv:2010.11929
  sequence.py:
  conv1d            Conv1DEncoder           Dai 2017, arXiv:1610.00087
  mlp               MLPEncoder              MultiBench, arXiv:2107.07502
  text.py:
  dan               DANEncoder              Iyyer 2015, ACL
  gru               GRUEncoder              Cho 2014, arXiv:1406.1078
  lstm              LSTMEncoder             Hochreiter & Schmidhuber 1997
  text_transformer  TextTransformerEncoder  Vaswani 2017, arXiv:1706.03762

(``fused_conv.py`` is not an encoder: it computes ``lenet``'s blocks.)
"""

from mmjax.encoders import image
from mmjax.encoders import resnet
from mmjax.encoders import sequence
from mmjax.encoders import text
from mmjax.encoders import vit
from mmjax.encoders.base import Encoder, Encoding

__all__ = ["Encoder", "Encoding", "image", "resnet", "sequence", "text", "vit"]
