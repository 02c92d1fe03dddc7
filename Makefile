# Quick start: `make demo` and `make test`. Both create .venv if missing and install bdl into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bdl-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bdl fit --config configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) experiments/benchmark_layers.py
	$(PY) experiments/benchmark_predict.py
	$(PY) experiments/benchmark_svi.py

clean:
	rm -rf $(VENV) runs .pytest_cache
