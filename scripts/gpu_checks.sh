#!/usr/bin/env bash
# The checks that need a GPU, in one run on a lent machine (issue #13, item 5): the capacity
# search for naive vs 1 stage with re-materialization on one GPU in bf16-mixed, and
# giantpipe-plan --device cuda against torch.cuda.max_memory_allocated.
#
#   bash scripts/gpu_checks.sh prepare    # here: the pure-Python packages the GPU image lacks
#                                         # (hydra-core, omegaconf, antlr4) into .gpu_site/
#   device run: command "bash scripts/gpu_checks.sh", carry [".gpu_site"], timeout_s 540
#
# The image there has torch and Lightning; giantpipe runs from src/ on PYTHONPATH. Results land
# in $OUT (bench_capacity_gpu.json and the log); copy the JSON to docs/results/ and the numbers
# to the README's Capacity section with the date.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    rm -rf .gpu_site && mkdir -p .gpu_site
    for pkg in hydra omegaconf antlr4; do cp -r "$site/$pkg" .gpu_site/; done
    grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >> .git/info/exclude
    du -sh .gpu_site
    exit 0
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu_site" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/log"
timeout 500 python3 scripts/bench_capacity.py --device cuda --out "$OUT/bench_capacity_gpu.json" 2>&1 | tee -a "$OUT/log"
