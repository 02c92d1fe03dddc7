# Quick start: `make demo` and `make test`. Both create .venv if missing and install bdl into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bdl-installed

.PHONY: demo test bench bench-peers results install clean

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

# Every method on every offline data set, 3 seeds: experiments/results/*.md. The two runs took 39 minutes
# together on the 2-core development VM (session 11); MNIST-1D trains 3x its configs' 30 epochs (at 30 every
# method is still improving).
results: $(STAMP)
	$(PY) experiments/uncertainty_table.py --seeds 3 --datasets digits regression_gap diabetes mnist1d_reference --reference-epochs 120
	$(PY) experiments/uncertainty_table.py --seeds 3 --datasets mnist1d --epochs-scale 3

# Installs the peer libraries (the `peers` extra) into .venv, then compares speed and quality with them.
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,peers]"
	$(PY) experiments/benchmark_peers.py --steps 12 --predict-repeats 7
	$(PY) experiments/benchmark_peers.py --sizes 64-128-128-10 --steps 30 --predict-repeats 21
	$(PY) experiments/peer_quality.py --seeds 0 1 2 3 4 5 6 7 8 9 --threads 1 --out experiments/results/peer_quality.md
	$(PY) experiments/peer_quality.py --seeds 0 1 2 3 4 5 6 7 8 9 --threads 1 --epochs 120 --out experiments/results/peer_quality_120_epochs.md

clean:
	rm -rf $(VENV) runs .pytest_cache
