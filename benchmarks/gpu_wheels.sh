#!/usr/bin/env bash
# The wheels the GPU machine lacks, into .whl (gitignored), for run_gpu.sh: run here, on the CPU
# machine (the GPU machine reaches no registry), then name ".whl" in the device tool's carry. That
# machine (Python 3.12; its package list: /work/.library/device/KINDS.md) already has torch,
# transformers, accelerate, pyarrow, pytest-xdist, pytest-timeout and hypothesis; it lacks orjson
# (every cube export) and nnsight 0.8.1 with the parts of it that import (bench-nnsight). ~3.5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
binary=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl)
python3 -m pip download -q "${binary[@]}" orjson==3.13.0 nnsight==0.8.1 greenlet==3.5.6 pydantic-core==2.46.4
python3 -m pip download -q --no-deps -d .whl pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2
ls .whl
