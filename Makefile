# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs, once: torch's CPU wheel and the project with
# its extras, at the exact versions of the lock file (pip -c $(LOCK)), then checks that the lock
# pinned everything that was installed. The stamp is rebuilt when pyproject.toml, the lock, its
# script or this file changes. `make lock` rewrites the lock (see README.md, "The lock file").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel lies on these machines; an unpinned torch would pull the CUDA build (GBs).
# Override elsewhere, e.g. `make test TORCH_SPEC=torch LOCK=` (the lock pins torch 2.13.0+cpu).
TORCH_SPEC ?= torch==2.13.0
# The lock file; `LOCK=` installs without it (pip then resolves the newest matching versions).
LOCK ?= requirements/constraints.txt
LOCK_SCRIPT := requirements/lock.py
EXTRAS ?= pipeline,test,demo
STAMP := $(VENV)/.seapig-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench lock clean

$(STAMP): pyproject.toml Makefile $(LOCK) $(LOCK_SCRIPT)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(LOCK),-c $(LOCK)) "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	$(if $(LOCK),$(PY) $(LOCK_SCRIPT) check --lock $(LOCK) --extras $(EXTRAS))
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m flows.demo

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Rewrite the lock from pyproject.toml in a throw-away venv (keeps the locked versions where they
# still fit; `make lock UPGRADE=1` resolves everything afresh). Run `make test` before committing it.
lock:
	$(PYTHON) $(LOCK_SCRIPT) write --lock $(or $(LOCK),requirements/constraints.txt) --extras $(EXTRAS) \
		--torch "$(TORCH_SPEC)" --python $(PYTHON) $(if $(UPGRADE),--upgrade)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo_output
