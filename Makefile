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

# Main job on the embedded default (local directory store, local Ray, CPU). Until the end-to-end
# pipeline lands: generate the demo dataset (once), then extract teacher features with the real
# pretrained EfficientNet-Lite trio at full resolution. A second `make demo` reuses the entry.
DEMO_N ?= 120
demo: $(STAMP)
	$(PY) -m ray_jobs.make_demo_data --out data/demo --n $(DEMO_N)
	$(PY) -m ray_jobs.extract --config configs/extract_demo.yaml

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
