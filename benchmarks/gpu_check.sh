#!/usr/bin/env bash
# The GPU check (benchmarks/README.md): one JSON under benchmarks/results/, about 6-8 minutes on one CUDA GPU.
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
