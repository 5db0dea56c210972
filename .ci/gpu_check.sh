#!/usr/bin/env bash
# The GPU check of issue 16, as one script of about 10 minutes on one GPU:
#   1. installs mmjax with CUDA jaxlib (skipped with MMJAX_INSTALL=0, e.g. on
#      an image that already holds jax[cuda] and mmjax's dependencies);
#   2. benchmarks the attention-bottleneck fusion (mm_shapes, fusion=mbt) in
#      bfloat16 with `mmjax.bench`, scaled up so that the GPU has work, and
#      prints its model FLOPs utilisation against PEAK_TFLOPS (dense bf16;
#      989 for H100/H200 SXM, 312 for A100);
#   3. trains AV-MNIST late fusion for MultiBench's 30 epochs, 3 seeds as one
#      program, and prints their test accuracy.
#
#   .ci/gpu_check.sh [OUT_DIR]
#
# Environment: MANUAL_DIR (AV-MNIST's raw files; default
# ../shared/data/avmnist_raw), PEAK_TFLOPS, MMJAX_INSTALL.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/mmjax/gpu_check}"
manual_dir="${MANUAL_DIR:-../shared/data/avmnist_raw}"
peak_tflops="${PEAK_TFLOPS:-989}"
mkdir -p "$out"

if [[ "${MMJAX_INSTALL:-1}" == 1 ]]; then
  python -m pip install -q -e '.[cuda]'
fi
python - <<'EOF'
import jax
print("jax", jax.__version__, "devices:", jax.devices())
assert jax.default_backend() == "gpu", "no GPU visible to jax"
EOF

echo "== mmjax.bench: mm_shapes attention bottlenecks (mbt), bfloat16"
python -m mmjax.bench --config=experiments/mm_shapes.py:fusion=mbt \
    --config.model.dtype=bfloat16 --batch_size=1024 \
    --config.model.fusion.dim=512 --config.model.fusion.mlp_dim=2048 \
    --config.model.fusion.num_heads=8 --config.model.fusion.num_layers=4 \
    --config.model.encoders.image.features=128+256 \
    --config.model.encoders.question.hidden=512 \
    --steps=50 --warmup=10 | tee "$out/bench_mbt_bf16.json"
python - "$out/bench_mbt_bf16.json" "$peak_tflops" <<'EOF'
import json, sys
record = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
peak = float(sys.argv[2]) * 1e12 * record["devices"]
mfu = record["flops_per_step"] / (record["ms_per_step"] / 1e3) / peak
print(f"{record['device_kind']}: {record['examples_per_sec']:,.0f} examples/s, "
      f"{record['achieved_gflops'] / 1e3:,.1f} TFLOP/s, model FLOPs "
      f"utilisation {mfu:.1%} of {sys.argv[2]} TFLOP/s (target: 40%)")
EOF

echo "== AV-MNIST late fusion, 30 epochs, seeds 0-2 as one program"
python -m mmjax.main --config=experiments/avmnist.py:epochs=30 \
    --config.dataset.manual_dir="$manual_dir" --config.train.num_seeds=3 \
    --workdir="$out/avmnist_30ep" 2>&1 | tail -n 4
python - "$out/avmnist_30ep/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
each = ", ".join("%.4f" % s["test"]["accuracy"] for s in r["per_seed"])
print("AV-MNIST late fusion, 30 epochs: test accuracy "
      f"{r['test']['accuracy']:.4f} ± {r['std']['test']['accuracy']:.4f} "
      f"(seeds {r['seeds']}: {each}); {r['train_seconds'] / 60:.1f} min, "
      f"{r['examples_per_sec']:,.0f} examples/s over all seeds")
EOF
