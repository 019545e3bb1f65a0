#!/usr/bin/env bash
# One-shot GPU benchmark of rsgm (ZDC generation eager vs compiled, CDI features, DI statistics,
# B4B overhead), 1 GPU against 1 CPU process. Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu.sh            # about 5 minutes on an H200, torch.compile warm-up included
#
# Writes benchmarks/results/gpu_bench.md (the table) and benchmarks/results/gpu_bench.json.
# Extra arguments go to benchmarks/gpu_bench.py (e.g. --sections zdc di, --budget 1).
# Needs torch with CUDA and diffusers (the CDI section's tiny DiT and digits UNet); on a machine
# without a package index, install the diffusers wheel (and its importlib_metadata) first.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 900 "${PYTHON:-python3}" benchmarks/gpu_bench.py --out benchmarks/results "$@"
# Optional, about 2 more minutes: 1 vs 2 vs 4 CPU processes of benchmarks/scaling.py on this
# machine's cores (a quiet many-core machine gives the clean scaling number docs/scale.md asks for).
if [ "${RSGM_BENCH_SCALING:-0}" = 1 ]; then
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 600 "${PYTHON:-python3}" benchmarks/scaling.py --processes 1 2 4 \
    --json benchmarks/results/scaling_cpu.json || echo "scaling benchmark failed (exit $?)"
fi
