r"""Fusion ablation on ``mm_shapes/relational``: one experiment, one knob.

Every fusion block that applies to an image and a question, plus the
image-only and question-only baselines, trained for the same number of steps
with the same data and optimiser; only ``fusion=`` (or ``modalities=``)
changes. Each is trained with seeds 0, 1 and 2 (initialisation and data
order), and the table reports their mean and standard deviation: one seed's
accuracy moves by several points. FiLM also runs with the paper's classifier
(``film_paper``; the experiment's default flattens the feature map, see
``experiments/mm_shapes.py``). ``svm`` is the classical baseline
(``mmjax/svm.py``): an RBF SVM on the standardised pixels and question
words, fit on 10,000 train examples drawn with each seed. Run, resume and
tabulate with:

  python -m mmjax.sweep --sweep=experiments/ablations/mm_shapes_fusion.py \
      --workdir=/tmp/mmjax/ablations/mm_shapes_fusion

The README's table was made with the command prefixed by ``taskset -c 1``
(one core of the 2-core CPU machine), so that examples/sec are one core's.
"""

CONFIG = "experiments/mm_shapes.py"

FUSIONS = ("film", "concat", "decision", "tensor", "low_rank",
           "multiplicative", "gated", "nonlocal_gated", "mfb", "mutan", "mult",
           "mm_transformer", "mm_transformer_late", "mbt")

# The same budget for every variant: 2,000 steps at batch 128 (4.3 epochs),
# about 8 minutes for FiLM on one CPU core. Evaluate once, at the end.
OVERRIDES = {"train.steps": 2000, "train.eval_every_steps": 2000,
             "checkpoint.every_steps": 1000}


SEEDS = (0, 1, 2)


def get_sweep() -> list[dict]:
  methods = [(fusion, f"fusion={fusion},dataset=relational", {})
             for fusion in FUSIONS]
  methods += [
      ("film_paper", "fusion=film,dataset=relational",
       {"model.fusion.classifier": "paper"}),
      ("image_only", "modalities=image,dataset=relational", {}),
      ("question_only", "modalities=question,dataset=relational", {}),
      # The classical baseline (mmjax/svm.py): the seed draws its 10,000
      # train examples; it takes no steps, so OVERRIDES change nothing in it.
      ("svm", "svm,dataset=relational", {}),
  ]
  return [dict(name=f"{method}_seed{seed}", group=method, arg=arg,
               overrides=dict(OVERRIDES, seed=seed, **overrides))
          for method, arg, overrides in methods for seed in SEEDS]
