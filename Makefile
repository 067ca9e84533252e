# One entry point. `make test` and `make smoke` set everything up on a fresh machine
# (Python 3.12 is the only prerequisite; Debian packages are installed when run as root).

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTHON312 := $(shell bash tools/find_python312.sh)
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: setup system-deps test smoke bench clean

setup: $(STAMP) system-deps

$(STAMP): pyproject.toml grail_megatron/versions.toml tools/pins.py
	@test -n "$(PYTHON312)" || exit 1
	@[ -x $(PY) ] || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PYTHON312) tools/pins.py > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	$(PY) -c "from grail_megatron.versions import installed_mismatches as m; bad = m(); assert not bad, bad"
	touch $(STAMP)

# Debian packages the tests use for real (SLURM, munge, bubblewrap); skipped if present.
system-deps:
	@bash tools/system_deps.sh

test: setup
	$(VENV)/bin/pytest -q tests

smoke: setup
	bash scripts/smoke.sh

bench: setup
	$(PY) benchmarks/rewards.py

clean:
	rm -rf $(VENV) .pytest_cache
