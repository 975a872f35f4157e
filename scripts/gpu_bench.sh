#!/usr/bin/env bash
# The GPU benchmark in one bounded command, on a GPU machine's stock image.
#
#   scripts/gpu_bench.sh                        # results in $OUT/bench (OUT defaults to ./bench_gpu_out)
#   BENCH_LIMIT_S=300 PYTHON=python3 scripts/gpu_bench.sh
#
# Needs only a python with torch (CUDA), torchvision, numpy, Pillow and PyYAML, in whatever
# recent versions are there: it installs nothing and imports neither Ray, open_clip nor
# pycocotools. It runs this checkout (PYTHONPATH) as
#   python -m paf_ray bench --device cuda --cases gpu,step,compile
# gpu first: the 3-task R50-FPN at 1280x736, batch 8, bf16 autocast + channels_last, finetune
# and adapt each in its own process (images/s, peak memory, FLOPs, MFU); then the adapt/finetune
# step at 640x384 and the torch.compile variant. bench.json / bench.md are rewritten after every
# case, so a run stopped at the time limit still leaves the cases it finished. Then, each with its
# own bound and without changing the exit status: the fp32-vs-bf16 box check on the GPU
# (tests/box_check.py: CUDA autocast casts other ops than the CPU autocast the tests use), and the
# LV-Adapter case (`--cases lv_overhead`, where open_clip is installed).
# Exit status: the bench's (0 = every case ran), 124 = stopped at the limit, 3 = the python
# cannot run it (what is missing is printed).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_gpu_out}"
LIMIT_S="${BENCH_LIMIT_S:-330}"
CASES="${BENCH_CASES:-gpu,step,compile}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF' || exit 3
import importlib.util
import sys

missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "yaml") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_bench: {sys.executable} lacks {', '.join(missing)} (pip names: torch torchvision numpy pillow pyyaml)")
import torch
import torchvision

if not torch.cuda.is_available():
    sys.exit(f"gpu_bench: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA {torch.version.cuda} on {torch.cuda.get_device_name(0)}")
EOF

# The bench works in a scratch folder (batches, per-case files); bench.json, bench.md and the
# log land in $OUT/bench.
WORK="$(mktemp -d /tmp/paf-bench.XXXXXX)"
timeout --signal=TERM --kill-after=20 "$LIMIT_S" "$PY" -m paf_ray bench --device cuda --cases "$CASES" --out "$WORK" \
    2>&1 | tee "$OUT/bench/log.txt"
status=${PIPESTATUS[0]}
cp "$WORK"/bench.json "$WORK"/bench.md "$OUT/bench/" 2>/dev/null || echo "gpu_bench: no bench.json was written"

timeout --signal=TERM --kill-after=20 "${BOX_LIMIT_S:-120}" "$PY" tests/box_check.py --device cuda \
    > "$OUT/bench/box_check.json" && echo "gpu_bench: box check passed (<= 0.01 px)" \
    || echo "gpu_bench: box check FAILED or did not finish ($OUT/bench/box_check.json)"
if "$PY" -c "import open_clip" 2>/dev/null; then
    timeout --signal=TERM --kill-after=30 "${LV_LIMIT_S:-240}" "$PY" -m paf_ray bench --device cuda \
        --cases lv_overhead --out "$WORK/lv" 2>&1 | tee "$OUT/bench/lv_overhead.txt"
fi

exit "$status"
