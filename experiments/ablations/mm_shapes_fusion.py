r"""Fusion ablation on ``mm_shapes/relational``: one experiment, one knob.

Every fusion block that applies to an image and a question, plus the
image-only and question-only baselines, trained for the same number of steps
with the same data, seed and optimiser; only ``fusion=`` (or ``modalities=``)
changes. Run, resume and tabulate with:

  python -m mmjax.sweep --sweep=experiments/ablations/mm_shapes_fusion.py \
      --workdir=/tmp/mmjax/ablations/mm_shapes_fusion

The README's table was made with the command prefixed by ``taskset -c 0``
(one core of the 2-core CPU machine), so that examples/sec compare.
"""

CONFIG = "experiments/mm_shapes.py"

FUSIONS = ("film", "concat", "decision", "tensor", "low_rank",
           "multiplicative", "gated", "nonlocal_gated", "mfb", "mutan", "mult",
           "mm_transformer", "mm_transformer_late", "mbt")

# The same budget for every variant: 2,000 steps at batch 128 (4.3 epochs),
# about 8 minutes for FiLM on one CPU core. Evaluate once, at the end.
OVERRIDES = {"train.steps": 2000, "train.eval_every_steps": 2000,
             "checkpoint.every_steps": 1000}


def get_sweep() -> list[dict]:
  variants = [dict(name=fusion, arg=f"fusion={fusion},dataset=relational")
              for fusion in FUSIONS]
  variants += [
      dict(name="image_only", arg="modalities=image,dataset=relational"),
      dict(name="question_only", arg="modalities=question,dataset=relational"),
  ]
  return [dict(v, overrides=OVERRIDES) for v in variants]
