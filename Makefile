PY ?= python3
DIGITS ?= data_digits

.PHONY: install test demo bench

install:
	$(PY) -m pip install -q -r requirements.txt

# The test command of the README and of .ci/run.
test: install
	$(PY) -m pytest -q tests

# The main job on the embedded real dataset: write digits folders, train, evaluate, re-evaluate the checkpoint.
demo: install
	bash tools/demo.sh $(DIGITS)

bench: install
	$(PY) tools/benchmark.py
