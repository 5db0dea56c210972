r"""The fusion comparison on AV-MNIST: every method of ``experiments/avmnist.py``
and the two unimodal baselines, 3 seeds each.

Only ``fusion=`` (or ``modalities=``) and ``seed=`` change between runs. Run,
resume and tabulate (mean ± std over the seeds) with:

  python -m mmjax.sweep --sweep=experiments/ablations/avmnist_fusion.py \
      --workdir=/tmp/mmjax/ablations/avmnist_fusion

The dataset is built on first use from ``../shared/data/avmnist_raw`` (see
``OVERRIDES``). ``EPOCHS`` is MultiBench's 30 on an accelerator; the table in
``docs/avmnist.md`` states the budget each of its rows used.
"""

CONFIG = "experiments/avmnist.py"

EXPERIMENTS = {
    "image_only": "modalities=image",
    "audio_only": "modalities=audio",
    "late_fusion": "fusion=concat",
    "tensor": "fusion=tensor",
    "low_rank": "fusion=low_rank",
    "multiplicative": "fusion=multiplicative",
    "film": "fusion=film",
    "gated": "fusion=gated",
    "mult": "fusion=mult",
}
SEEDS = (0, 1, 2)
EPOCHS = 30
OVERRIDES = {"dataset.manual_dir": "../shared/data/avmnist_raw"}


def get_sweep() -> list[dict]:
  return [dict(name=f"{name}_s{seed}", group=name,
               arg=f"{arg},seed={seed},epochs={EPOCHS}", overrides=OVERRIDES)
          for name, arg in EXPERIMENTS.items() for seed in SEEDS]
