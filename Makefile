# The two commands: `make speedrun` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= cpu
# The course's data: NANOCHAT_DATA if set, else ../shared/data beside this repository when it exists.
NANOCHAT_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export NANOCHAT_DATA
export MPLBACKEND ?= Agg

.PHONY: install test speedrun export clean-nbs book serve

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
test: install
	$(PY) -m pytest tests

speedrun: install
	@mkdir -p outputs
	MPLBACKEND=module://matplotlib_inline.backend_inline $(PY) -m papermill lessons/speedrun.ipynb outputs/speedrun_$(PRESET).ipynb -p preset $(PRESET) -k python3 --log-output

# Execute chapters in place on this machine (the small presets the tests use) so that they are committed with what
# they printed and drew, stamped with a hash of their code (tests/test_notebooks.py fails on a stale chapter).
# NB=nbs/08_engine.ipynb executes just that one.
book: install
	$(PY) tools/book.py $(NB)

# Chat with a trained model in the browser (and through any OpenAI client): CHECKPOINT=<run folder> (default: the
# newest chat model under NANOCHAT_HOME), PORT=8000.
serve: install
	$(VENV)/bin/nanochat-serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) --port $(or $(PORT),8000)
