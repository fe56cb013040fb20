# The two quick-start commands: `make demo` and `make test`. Both create .venv from
# requirements.txt on first use (Python 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= work/demo

.PHONY: demo test bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) bin/demo.py --workdir=$(WORKDIR)

# One worker per core; test files stay whole on one worker (their module fixtures run once).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: $(VENV)/.installed
	$(PY) bench/input_pipeline.py --json
	$(PY) bench/mm_step.py --json
	$(PY) bench/graph_bench.py --json
	$(PY) bench/scaling.py --json
	$(PY) bench/data_check.py --json

clean-venv:
	rm -rf $(VENV)
