# The two commands a newcomer needs: `make demo` and `make test` (both install everything first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The fault-injecting S3 proxy of the fault tests: mitmproxy in a venv of its own, because its
# pins (h11, cryptography) conflict with huggingface_hub's and moto's.
PROXY_VENV := .venv-proxy
PROXY_STAMP := $(PROXY_VENV)/.installed

.PHONY: install proxy demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(PROXY_STAMP):
	test -x $(PROXY_VENV)/bin/python || $(PYTHON) -m venv $(PROXY_VENV)
	$(PROXY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PROXY_VENV)/bin/python -m pip install --quiet mitmproxy==11.0.2
	touch $(PROXY_STAMP)

proxy: $(PROXY_STAMP)

# Main job on the embedded default (local directory store, local Ray, CPU): demo data → teacher
# features → knowledge → students with and without KD (3 seeds) → report/. About 11 minutes on
# 2 cores; a second `make demo` reuses everything and only re-renders the report.
demo: $(STAMP)
	$(PY) -m ray_jobs.pipeline --config configs/demo.yaml

# Default test run: everything except tests marked slow or gpu.
test: $(STAMP) $(PROXY_STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

# Everything CPU can run, slow tests included.
test-all: $(STAMP) $(PROXY_STAMP)
	$(PY) -m pytest -m "not gpu" -q

bench: $(STAMP) $(PROXY_STAMP)
	$(PY) benchmarks/codec_choice.py
	$(PY) benchmarks/store_read.py
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/student_loader.py
	$(PY) benchmarks/reuse.py
	$(PY) benchmarks/distill_memory.py

clean:
	rm -rf $(VENV) $(PROXY_VENV) .pytest_cache .hypothesis
