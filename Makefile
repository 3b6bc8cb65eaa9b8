# simple_moe developer entry points (GNU make).
#
#   make test         unit tests under Triton's CPU interpreter, then check-build for SM80/86/89/90
#   make demo         run the demo (CPU interpreter when no NVIDIA GPU is present)
#   make bench        run the benchmark on the GPU (ARGS=--cpu-smoke: its code path on the CPU, times meaningless)
#   make check-build  compile every kernel variant for SM80/86/89/90, no GPU needed
#   make clean        remove caches and build outputs (keeps .venv; `make distclean` removes it too)
#
# The virtual environment is created only when .venv/bin/python is missing and the packages are installed once,
# recorded by a stamp file; an existing .venv is never removed or recreated.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check
STAMP       := $(VENV)/.simple_moe-installed
ARCHS       ?= 80,86,89,90
JOBS        ?=
ARGS        ?=

# torch is pinned and installed first: the CPU build of 2.13.0 lies on this machine's disk, while a bare `torch`
# requirement would fetch a CUDA build of several GB.
TORCH_PIN   := torch==2.13.0
# transformers (an optional extra of the package, ~15 MB) so CI exercises the Hugging Face integration on tiny models.
TEST_DEPS   := triton==3.6.0 "numpy<2.3" pytest hypothesis "transformers>=5,<6"

# Without a working NVIDIA GPU, Triton kernels run in its CPU interpreter. TRITON_INTERPRET must be set before
# triton is imported, so it is set here rather than in Python.
HAVE_GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUN_ENV     := $(if $(HAVE_GPU),,TRITON_INTERPRET=1)
JOBS_FLAG   := $(if $(JOBS),--jobs $(JOBS),)

.PHONY: test demo bench check-build venv clean distclean

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install $(TEST_DEPS) "$(TORCH_PIN)"
	$(PIP) install --no-deps -e .
	touch $@

venv: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	env -u TRITON_INTERPRET $(PY) -m simple_moe check-build --arch $(ARCHS) $(JOBS_FLAG)

check-build: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m simple_moe check-build --arch $(ARCHS) $(JOBS_FLAG) $(ARGS)

demo: $(STAMP)
	$(RUN_ENV) $(PY) -m simple_moe demo $(ARGS)

bench: $(STAMP)
	$(RUN_ENV) $(PY) -m simple_moe bench $(ARGS)

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
