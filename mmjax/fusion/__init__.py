"""Fusion blocks; importing this registers them.

What every block takes and returns is in ``mmjax.fusion.base``; the token
helpers of the attention blocks are in ``mmjax.fusion.tokens``. The
registered blocks, by file (``tests/test_block_contracts.py`` checks that
this table lists exactly the registered names, with their files and
classes):

  name            class                        paper
  concat.py:
  concat          ConcatFusion                 MultiBench, arXiv:2107.07502
  decision.py:
  decision        DecisionFusion               Snoek 2005, ACM Multimedia
  tensor.py:
  tensor          TensorFusion                 Zadeh 2017, arXiv:1707.07250
  low_rank        LowRankFusion                Liu 2018, arXiv:1806.00064
  multiplicative.py:
  multiplicative  MultiplicativeFusion         Jayakumar 2020, ICLR
  bilinear.py:
  mfb             MFBFusion                    Yu 2017, arXiv:1708.01471
  mutan           MutanFusion                  Ben-younes 2017, arXiv:1705.06676
  gated.py:
  gated           GatedFusion                  Arevalo 2017, arXiv:1702.01992
  nonlocal_gated  NonLocalGatedFusion          mmjax's; after Wang 2018
  film.py:
  film            FiLMFusion                   Perez 2018, arXiv:1709.07871
  crossmodal.py:
  mult            MulTFusion                   Tsai 2019, arXiv:1906.00295
  attention.py:
  mm_transformer  MultimodalTransformerFusion  Hendricks 2021, arXiv:2102.00529
  mbt             BottleneckFusion             Nagrani 2021, arXiv:2107.00135
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
