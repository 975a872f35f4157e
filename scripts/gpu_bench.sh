#!/usr/bin/env bash
# The GPU benchmark in one bounded command: `paf-ray bench --device cuda`, results in $OUT/bench.
#
#   scripts/gpu_bench.sh                  # results in $OUT/bench (OUT defaults to ./bench_gpu_out)
#   BENCH_LIMIT_S=420 scripts/gpu_bench.sh
#
# Run from anywhere; it works in the repository root. It installs nothing beyond
# `pip install -e .` into the venv (.venv, made with --system-site-packages when missing so a
# preinstalled CUDA torch is reused). With a `.whl/` folder of wheels in the repository root
# the install is offline (--no-index --find-links .whl), for machines without a registry.
# bench.json / bench.md are rewritten after every case, so a run stopped at the time limit
# still leaves the cases it finished. Exit status: the bench's (0 = every case ran),
# 124 = stopped at the limit.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_gpu_out}"
LIMIT_S="${BENCH_LIMIT_S:-480}"
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 RAY_DISABLE_USAGE_STATS=1
# A private HOME: the local Ray this starts writes its auth token under ~/.ray.
export HOME="${BENCH_HOME:-$(mktemp -d /tmp/paf-bench-home.XXXXXX)}"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv || exit 2
fi
PY=.venv/bin/python
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl -e . || exit 2
else
    "$PY" -m pip install -q -e . || exit 2
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF' || exit 3
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {torch.cuda.get_device_name(0)}")
EOF

# The bench works in a scratch folder (synthetic frames, per-case files); only bench.json,
# bench.md and the log land in $OUT/bench.
WORK="$(mktemp -d /tmp/paf-bench.XXXXXX)"
timeout --signal=TERM --kill-after=30 "$LIMIT_S" "$PY" -m paf_ray bench --device cuda --out "$WORK" \
    2>&1 | tee "$OUT/bench/log.txt"
status=${PIPESTATUS[0]}
cp "$WORK"/bench.json "$WORK"/bench.md "$OUT/bench/" 2>/dev/null || echo "gpu_bench: no bench.json was written"

# LV-Adapter overhead at the GPU settings (R50-FPN reference heads, 1280x736, batch 8, bf16), its own bound; does not change the exit status.
timeout --signal=TERM --kill-after=30 "${LV_LIMIT_S:-240}" "$PY" -m paf_ray.models.lv_adapter --device cuda --backbone resnet50 --heads reference --size 1280x736 --batch 8 --steps 10 2>&1 | tee "$OUT/bench/lv_overhead.txt"

exit "$status"
