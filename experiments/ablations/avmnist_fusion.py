r"""The fusion comparison on AV-MNIST: every method of ``experiments/avmnist.py``
and the two unimodal baselines, 3 seeds each.

Only ``fusion=`` (or ``modalities=``) changes between variants; each trains
its seeds 0-2 as one program (``train.num_seeds``), in the workdir
``<variant>/seed<k>``. Run, resume and tabulate (mean ± std over the seeds)
with:

  python -m mmjax.sweep --sweep=experiments/ablations/avmnist_fusion.py \
      --workdir=/tmp/mmjax/ablations/avmnist_fusion

The dataset is built on first use from ``../shared/data/avmnist_raw`` (see
``OVERRIDES``). ``svm`` is the classical baseline (``mmjax/svm.py``): an RBF
SVM on the standardised pixels and spectrograms, fit on 10,000 train
examples drawn with each seed (workdirs ``svm_seed<k>``), 2.5 minutes a
run.

The four ``*_moddrop`` variants (late fusion, a product fusion, the gate and
an attention fusion) train with modality dropout (``MODALITY_DROPOUT``,
``mmjax/models.py``), for the robustness table: ``--robustness
--robustness_reference=late_fusion`` evaluates every finished run with one
modality missing or noised (``mmjax/robustness.py``) and tabulates it.

``EPOCHS`` is the budget: MultiBench trains 30 epochs. On the 2-core CPU
machine a step of the audio LeNet runs at ~110 examples/s per core, so one
epoch takes ~8.5 minutes a run and the 27 runs take ~4 core-hours at 1 epoch
(~115 at 30): ``docs/avmnist.md`` reports the 1-epoch table. Set 30 where an
accelerator is available (and a new ``--workdir``).
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
# Robustness: these fusions also train with modality dropout.
MODDROP = ("late_fusion", "tensor", "gated", "mult")
# Each modality of each training example is dropped with this probability
# (never both): mmjax's choice, untuned.
MODALITY_DROPOUT = 0.25
SEEDS = (0, 1, 2)
EPOCHS = 1
OVERRIDES = {"dataset.manual_dir": "../shared/data/avmnist_raw"}


def get_sweep() -> list[dict]:
  return variants(EPOCHS)


def variants(epochs: int, overrides: dict | None = None,
             moddrop: bool = True) -> list[dict]:
  """The variants at a budget of ``epochs``, the networks' ``overrides``
  added to ``OVERRIDES``; without the ``*_moddrop`` runs unless ``moddrop``."""
  overrides = overrides or {}
  networks = [network(name, epochs, overrides) for name in EXPERIMENTS]
  networks += [dict(network(name, epochs,
                            {**overrides,
                             "model.modality_dropout": MODALITY_DROPOUT}),
                    name=f"{name}_moddrop")
               for name in (MODDROP if moddrop else ())]
  # The classical baseline (mmjax/svm.py): one run per seed, which draws its
  # 10,000 train examples; the group reports them together.
  svms = [dict(name=f"svm_seed{seed}", group="svm", arg=f"svm,seed={seed}",
               overrides=OVERRIDES) for seed in SEEDS]
  return networks + svms


def network(name: str, epochs: int, overrides: dict | None = None) -> dict:
  """The variant ``name`` of ``EXPERIMENTS`` trained for ``epochs``, its
  ``SEEDS`` as one program, with ``overrides`` added to ``OVERRIDES``."""
  return dict(name=name,
              arg=f"{EXPERIMENTS[name]},seed={SEEDS[0]},epochs={epochs}",
              overrides={**OVERRIDES, "train.num_seeds": len(SEEDS),
                         **(overrides or {})})
