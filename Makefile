# The two commands: `make speedrun` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= cpu
# The course's data: NANOCHAT_DATA if set, else ../shared/data beside this repository when it exists.
NANOCHAT_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export NANOCHAT_DATA
export MPLBACKEND ?= Agg

.PHONY: install test speedrun export clean-nbs book serve gpu-check

install: $(VENV)/.installed

# torch first, pinned to the CPU build on these machines (anything else pulls gigabytes of CUDA packages);
# on a GPU box install your own CUDA build of torch into .venv first, the range in pyproject.toml accepts it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

export: install
	$(VENV)/bin/nbdev-export

clean-nbs: install
	$(VENV)/bin/nbdev-clean

# tests/test_export_sync.py checks that nbdev-clean and nbdev-export leave no diff (on a copy of the tree);
# tests/test_notebooks.py executes every notebook; tests/test_lessons.py runs each lesson at preset `tiny`.
# The suite spreads over one pytest worker per core (at most 4; tests/conftest.py keeps a file's tests together),
# each worker's torch on its share of the cores so that workers do not fight over them.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: install
	OMP_NUM_THREADS=$$(( $$(nproc) / $(TEST_WORKERS) )) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup tests

speedrun: install
	@mkdir -p outputs
	name=$$($(PY) -c 'from nanochat_nb.scaling import output_name; print(output_name("speedrun", "$(PRESET)"))'); \
	MPLBACKEND=module://matplotlib_inline.backend_inline $(PY) -m papermill lessons/speedrun.ipynb outputs/$$name.ipynb -p preset $(PRESET) -k python3 --cwd lessons --log-output

# Execute chapters in place on this machine (the small presets the tests use) so that they are committed with what
# they printed and drew, stamped with a hash of their code (tests/test_notebooks.py fails on a stale chapter).
# NB=nbs/08_engine.ipynb executes just that one.
book: install
	$(PY) tools/book.py $(NB)

# Chat with a trained model in the browser (and through any OpenAI client): CHECKPOINT=<run folder> (default: the
# newest chat model under NANOCHAT_HOME), PORT=8000.
serve: install
	$(VENV)/bin/nanochat-serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) --port $(or $(PORT),8000)

# The GPU check (bench/gpu_check.py, about 8 minutes on one H100/H200): the CUDA-only tests, the training step at
# the d12 and d24 shapes with MFU, a short gpu1-shaped run through the speedrun lesson; everything lands in OUT.
# It runs under the machine's own python3 (no .venv, no network there): what that python lacks travels as wheels
# in .gpu_wheels/, downloaded here first. OUT=<folder>, REFERENCE=<nanochat checkout>, DRY=1: the CPU dry run.
GPU_WHEELS := rustbpe tqdm regex pyyaml papermill ipykernel ipywidgets
gpu-check: .gpu_wheels/.complete
	PYTHONPATH=. python3 bench/gpu_check.py --out $(or $(OUT),outputs/gpu_check) $(if $(REFERENCE),--reference $(REFERENCE),) $(if $(DRY),--dry-run,)

.gpu_wheels/.complete:
	python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_wheels $(GPU_WHEELS)
	du -sh .gpu_wheels
	touch $@
