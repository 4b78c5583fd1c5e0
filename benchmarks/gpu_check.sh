#!/usr/bin/env bash
# The GPU half of issue 19 in one script (under 8 minutes on one H100/H200-class GPU): the CUDA variants of
# the grouped dispatch tests, then the MoE layer benchmark at the shapes in bfloat16.
# Run from the repository root: bash benchmarks/gpu_check.sh   (results also go to $OUT, default ./gpu_out)
# Needs a CUDA build of torch (>= 2.9 for torch._grouped_mm) and triton; installs moeify itself if missing.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
python -c "import moeify" 2>/dev/null || python -m pip install -q --no-deps --no-build-isolation -e .
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))" 2>&1 | tee "$out/env.txt"
timeout 150 python -m pytest -q -p no:cacheprovider -rA tests/dispatch/test_grouped_mm.py \
    tests/dispatch/test_permute.py -k cuda 2>&1 | tee "$out/cuda_tests.txt"
timeout 300 python benchmarks/moe_layer.py --device cuda --gated --activation silu 2>&1 | tee "$out/bench.txt"
