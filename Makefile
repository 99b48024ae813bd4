PY ?= python3
DIGITS ?= data_digits

.PHONY: install install-dense test demo bench

install:
	$(PY) -m pip install -q -r requirements.txt

# Optional extra for dense prediction (smp); the tests need it.
install-dense:
	$(PY) -m pip install -q -r requirements-dense.txt

# The test command of the README and of .ci/run: two pytest-xdist workers (the cores of CI), one torch
# thread each (tests/conftest.py), the multi-rank tests all on one worker (harness.MULTI_RANK);
# TEST_WORKERS=0 runs in this one process.
TEST_WORKERS ?= 2
test: install install-dense
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadgroup

# The main job on the embedded real dataset: write digits folders, train, evaluate, re-evaluate the checkpoint.
demo: install
	bash tools/demo.sh $(DIGITS)

# Speed/memory of FLatten-Swin-T and its softmax baseline (see BENCHMARKS.md). With OFFICIAL=<checkout of
# LeapLabTHU/FLatten-Transformer>, also side by side with the official code (alternating rounds).
OFFICIAL ?=
bench: install
	$(PY) tools/benchmark.py --cfgs cfgs/flatten_swin_t.yaml cfgs/swin_t.yaml --json bench.json
	$(if $(OFFICIAL),$(PY) tools/benchmark.py --cfgs cfgs/flatten_swin_t.yaml --reference $(OFFICIAL) --json bench_official.json,)
