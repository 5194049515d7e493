# The two commands a newcomer needs: `make demo` and `make test` (both install everything first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded default (local directory store, local Ray, CPU): demo data → teacher
# features → knowledge → students with and without KD (3 seeds) → report/. About 11 minutes on
# 2 cores; a second `make demo` reuses everything and only re-renders the report.
demo: $(STAMP)
	$(PY) -m ray_jobs.pipeline --config configs/demo.yaml

# Default test run: everything except tests marked slow or gpu.
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

# Everything CPU can run, slow tests included.
test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q

bench: $(STAMP)
	$(PY) benchmarks/codec_choice.py
	$(PY) benchmarks/store_read.py
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/student_loader.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
