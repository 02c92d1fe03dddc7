#!/usr/bin/env bash
# The GPU checks a session runs on a lent device machine (the workplace's `run` tool), ~7 minutes on an H100 (session 8: 5.3 min with the suite cut at 140 s, which needed 195 s):
# the CUDA tests, the peer, predict and layer benchmarks on CUDA, then the whole suite with the GPU visible.
# Results go to $OUT (the tool's folder that comes back). The machine's image has torch, lightning and
# torchmetrics; pyro-ppl, mnist1d and the peers travel as wheels in .whl/ (ignored by git), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pyro-ppl pyro-api mnist1d jsonargparse docstring-parser \
#     typeshed-client bayesian-torch blitz-bayesian-pytorch torchbnn torch-uncertainty pytest-xdist execnet pytest-timeout
# and the call is run(command="bash experiments/gpu_check.sh", carry=[".whl"], timeout_s=600) (the steps' limits add
# up to 555 s). Without pytest-xdist or pytest-timeout the suite runs in one process, or without its per-test limit.
set -uo pipefail  # a step's status is its command's, not tee's or tail's
status=0  # the script's: non-zero when any step failed (the run tool's rc)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, pyro, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__, 'pyro', pyro.__version__, 'torchmetrics', torchmetrics.__version__)"
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -c "from bdl.lightning.cli import console; console()" "$@"\n' > /tmp/bin/bdl && chmod +x /tmp/bin/bdl && export PATH=/tmp/bin:$PATH
echo "== cuda tests"; timeout 100 python3 -m pytest -m cuda -q -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tee $OUT/cuda_tests.log | tail -15 || status=1
echo "== peers large"; timeout 75 python3 experiments/benchmark_peers.py --device cuda --steps 50 --predict-repeats 21 2>&1 | tee $OUT/bench_peers.txt || status=1
echo "== peers small"; timeout 60 python3 experiments/benchmark_peers.py --device cuda --sizes 64-128-128-10 --steps 50 --predict-repeats 21 2>&1 | tee $OUT/bench_peers_small.txt || status=1
echo "== predict"; timeout 50 python3 experiments/benchmark_predict.py --device cuda 2>&1 | tee $OUT/bench_predict.txt || status=1
echo "== layers"; timeout 40 python3 experiments/benchmark_layers.py --device cuda --steps 50 --protocol interleaved 2>&1 | tee $OUT/bench_layers.txt || status=1
suite=()  # -n and --timeout are plugins' options: pytest refuses them where the plugin is not installed
python3 -c "import xdist" 2>/dev/null && suite+=(-n 12) || echo "(pytest-xdist not installed: the suite runs in one process)"
python3 -c "import pytest_timeout" 2>/dev/null && suite+=(--timeout 170) || echo "(pytest-timeout not installed: no per-test limit)"
echo "== full suite"; timeout 230 python3 -m pytest -q ${suite[@]+"${suite[@]}"} -p no:cacheprovider -m "not cuda" --durations=12 2>&1 | tee $OUT/suite.log | tail -20 || status=1
exit $status
