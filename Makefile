# Squeeze: `make run` for the embedded server, `make test` for the suite, `make bench` for benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench lint clean

install: $(STAMP)

# torch is pinned exactly in pyproject.toml: a looser pin would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[worker,test]'
	touch $(STAMP)

run: install
	$(VENV)/bin/squeeze server

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .squeeze .pytest_cache
