# `make demo` and `make test` each build .venv from nothing on a fresh machine.
# `make test` is the suite on one machine (~35 min on 2 cores); `make test-cluster` the tests that
# start clusters, Ray's autoscaler or fault-injected object storage (markers cluster, autoscaler,
# faults: ~25 min, root); CI runs both (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-cluster bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,mlflow]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/paf-ray demo --out demo_out

HEAVY := cluster or autoscaler or faults

test: $(STAMP)
	$(PY) -m pytest -q tests -m "not ($(HEAVY))"

test-cluster: $(STAMP)
	$(PY) -m pytest -q tests -m "$(HEAVY)"

bench: $(STAMP)
	$(VENV)/bin/paf-ray bench --out bench_out

clean:
	rm -rf $(VENV) demo_out bench_out runs
