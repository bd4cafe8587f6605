# Everything runs from a venv this Makefile builds itself (python3 -m venv), with the pinned dev set.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-thorough lint bench-kernel install clean

demo: $(STAMP)  ## the main job (until the generator lands: the kernel benchmark, quick shapes)
	$(PY) benchmarks/kernel.py --quick

test: $(STAMP)  ## lint + the whole test suite
	$(VENV)/bin/ruff check pensieve tests benchmarks
	$(VENV)/bin/ruff format --check pensieve tests benchmarks
	$(PY) -m pytest -q

test-thorough: $(STAMP)  ## bigger hypothesis budgets
	PENSIEVE_THOROUGH=1 $(PY) -m pytest -q

bench-kernel: $(STAMP)
	$(PY) benchmarks/kernel.py

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis *.egg-info
