r"""Contrastive image-caption alignment on ``mm_shapes``: two towers, CLIP or
SigLIP.

An image tower (the CNN of ``experiments/mm_shapes.py``, pooled to 128) and a
caption tower (an LSTM over the caption's words, as the question's), each
projected linearly to a 128-d joint space, trained so that an image and its
caption ("a red circle and two blue squares") score higher than the other
pairs of the batch (``mmjax.contrastive``). No answers or questions are
used. Evaluation: image-to-text and text-to-image recall@1/5 on each eval
split (5,000 pairs) and, on ``simple``, zero-shot classification of the
single-object images into the 12 colour-shape classes, each class the
caption "a <colour> <shape>" (``config.eval.zero_shot_prompts``). Run with:

  python -m mmjax.main --config=experiments/mm_shapes_contrastive.py \
      --workdir=/tmp/mmjax/contrastive

Variants, as ``--config=experiments/mm_shapes_contrastive.py:<arg>,<arg>``:

  loss=clip             CLIP's softmax loss (Radford et al. 2021; default)
  loss=siglip           SigLIP's sigmoid loss (Zhai et al. 2023)
  positives=same_text   pairs with identical captions are positives
                        (default): on ``simple`` half the examples of a
                        batch share their caption with another. It changes
                        SigLIP's loss; CLIP's is the same either way while
                        equal captions embed equally (mmjax/contrastive.py)
  positives=pair        only the pair itself, as the papers (every other
                        caption of the batch is a negative)
  dataset=relational    3-6 objects with sizes: captions are nearly unique
                        (no zero-shot prompts: no image has one object)
  runlocal              a few steps on small batches, for tests and CI

The towers then warm-start a fusion model: ``--config.init_from=<this run>
--config.init_from_parts="('encoders_image',)"`` on
``experiments/mm_shapes.py:fusion=concat`` copies the image tower's encoder
(its parameter names and shapes are those of that model's image encoder);
``experiments/ablations/mm_shapes_contrastive.py`` measures what it gives
with 10% of the labels.
"""

import ml_collections

from mmjax import config_common
from mmjax.data import mm_shapes

# Zero-shot classes on `simple`: its one-object captions.
OBJECT_PROMPTS = tuple(f"a {color} {shape}" for color in mm_shapes.COLORS
                       for shape in mm_shapes.SHAPES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_common.parse_arg(arg, loss="clip", positives="same_text",
                                dataset="simple", runlocal=False)
  # Late fusion's encoders: the image CNN pooled to 128 features, the
  # warm-start target's.
  config = config_common.sibling_experiment(
      __file__, "mm_shapes.py", f"fusion=concat,dataset={arg.dataset}" +
      (",runlocal" if arg.runlocal else ""))
  image_and_caption = ("normalize(key='image')|"
                       "tokenize(key='caption', max_len=16)|"
                       "keep(keys=('image', 'caption', 'caption_mask'))")
  config.input.pp_train = config.input.pp_eval = image_and_caption
  model = config.model
  model.modalities = ("image", "caption")
  model.encoders.caption = model.encoders.question
  del model.encoders["question"]
  del model["fusion"], model["heads"]
  model.contrastive = dict(loss=arg.loss, positives=arg.positives,
                           embed_dim=128, chunked=False)
  if not arg.runlocal:
    # Each image is contrasted with the other 255 captions of the batch.
    config.input.batch_size = 256
    config.train.update(steps=2000, eval_every_steps=1000)
    config.checkpoint.every_steps = 1000
  config.eval.zero_shot_prompts = (OBJECT_PROMPTS if arg.dataset == "simple"
                                   else ())
  return config
