r"""Contrastive pre-training on ``mm_shapes/simple``, and what it gives a
fusion model trained with 10% of the labels.

Part 1, pre-training (``experiments/mm_shapes_contrastive.py``, seed 0, all
60,000 train images and captions, no answers): CLIP and SigLIP, each with
identical captions counted as positives (the experiment's default) and with
only the pair itself (``positives=pair``, the papers' setting). The table
reports retrieval recall@1/5 both ways and zero-shot accuracy.

Part 2, fine-tuning (``experiments/mm_shapes.py:fusion=concat``, late fusion,
whose image encoder has the image tower's shapes), 1,000 steps on the first
6,000 train examples (``train[:10%]``), seeds 0-2:

  scratch_10pct   from a fresh initialisation
  clip_10pct      image encoder warm-started from the CLIP run's image tower
                  (``init_from_parts=('encoders_image',)``); the question
                  encoder starts fresh (its vocabulary is the questions',
                  the caption tower's the captions')
  siglip_10pct    the same from the SigLIP run
  scratch_full    all 60,000 labelled examples, fresh: the reference

Run, resume and tabulate with:

  python -m mmjax.sweep --sweep=experiments/ablations/mm_shapes_contrastive.py \
      --workdir=/tmp/mmjax/ablations/mm_shapes_contrastive
"""

CONFIG = "experiments/mm_shapes_contrastive.py"
FINETUNE_CONFIG = "experiments/mm_shapes.py"

SEEDS = (0, 1, 2)
TEN_PERCENT = {"dataset.train_split": "train[:10%]"}


def _pretraining() -> list[dict]:
  return [dict(name=f"{loss}{suffix}", arg=f"loss={loss},positives={positives}",
               overrides={"seed": 0})
          for loss in ("clip", "siglip")
          for positives, suffix in (("same_text", ""), ("pair", "_pairs_only"))]


def _finetuning() -> list[dict]:
  starts = {"scratch_10pct": TEN_PERCENT, "scratch_full": {}}
  for tower in ("clip", "siglip"):
    starts[f"{tower}_10pct"] = dict(
        TEN_PERCENT, init_from=f"{{workdir}}/{tower}",
        init_from_parts=("encoders_image",))
  return [dict(name=f"{start}_seed{seed}", group=start,
               config=FINETUNE_CONFIG, arg="fusion=concat",
               overrides=dict(overrides, seed=seed))
          for start, overrides in starts.items() for seed in SEEDS]


def get_sweep() -> list[dict]:
  return _pretraining() + _finetuning()
