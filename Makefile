# Squeeze: `make run` for the embedded server, `make test` for the suite, `make bench` for benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench lint clean

install: $(STAMP)

# torch is pinned exactly in pyproject.toml: a looser pin would pull a multi-GB CUDA build.
# The client package (client/: the `squeeze` command) is installed beside the server, both editable.
$(STAMP): pyproject.toml client/pyproject.toml
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null; } \
	  || { echo "Squeeze runs model code in bubblewrap: install it (apt-get install bubblewrap)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[worker,test]'
	$(PY) -m pip install -q -e ./client  # after the server: an older server install owned the squeeze script
	touch $(STAMP)
	@echo "installed; the squeeze command is $(VENV)/bin/squeeze (source $(VENV)/bin/activate puts it on PATH)"

run: install
	$(VENV)/bin/squeeze server

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Unit and in-process tests only (no live stack, sandbox, browser or engine suite): the inner loop, minutes.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run

# The README's example files (committed; this writes them again): a tiny MLP .pt2 and an eval .npz.
.PHONY: examples
examples: install
	$(PY) examples/make_examples.py

clean:
	rm -rf $(VENV) .squeeze .pytest_cache
