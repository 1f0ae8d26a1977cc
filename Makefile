# tphtrap developer entry points. Every target uses the project's own virtual environment.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  ?= $(BIN)/python -m pytest

.PHONY: help deps setup test demo lint policy-check bench bench-compare fuzz integration traces c-client clean
# deps must finish before the virtual environment is made (it may install python3-venv).
.NOTPARALLEL:

help:
	@echo "make deps          install the Debian packages of deps/debian-packages.txt (as root)"
	@echo "make demo          replay the bundled guest trace against the bundled policy"
	@echo "make test          run the test suite (creates .venv on first use)"
	@echo "make lint          ruff and mypy"
	@echo "make policy-check  check every example policy"
	@echo "make bench         benchmarks; writes bench/results.md"
	@echo "make bench-compare BASE=COMMIT   serve latency of this tree against COMMIT, side by side"
	@echo "                   (C=1: with the C client, in both backends; WORST=N: the worst decision, N rounds)"
	@echo "make fuzz          a longer fuzzing campaign"
	@echo "make integration   boot QEMU guests with the SSDT of tphtrap acpi guest (about a minute)"
	@echo "make traces        record real QEMU guest traces into fixtures/traces (Debian kernel, TCG)"
	@echo "make c-client      build the C client library and its test program into build/c"
	@echo "make clean         remove .venv and caches"

# Installs what is missing as root; otherwise stops with the one command to run.
deps:
	@sh tools/setup-debian

$(STAMP): pyproject.toml tphtrap/native/_steady.c tphtrap/_bulk.c
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tphtrap needs Python 3.11 or newer")'
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { echo "python3 venv support is missing; run: sudo apt-get install -y python3-venv" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: deps $(STAMP)

test: deps $(STAMP)
	$(PYTEST) -q

demo: deps $(STAMP)
	$(BIN)/tphtrap inspect fixtures/devices/nic-st-in-cap.lspci
	$(BIN)/tphtrap replay fixtures/traces/demo-session.jsonl --policy policies/two-tenants.yaml

lint: $(STAMP)
	$(BIN)/ruff check tphtrap tests examples bench
	$(BIN)/ruff format --check tphtrap tests examples bench
	$(BIN)/mypy tphtrap

policy-check: $(STAMP)
	$(BIN)/tphtrap policy check policies/*.yaml

bench: $(STAMP)
	$(BIN)/python bench/run.py --output bench/results.md

BASE ?= 31d353d
bench-compare: $(STAMP)
	$(BIN)/python bench/compare.py $(BASE) $(if $(C),--c) $(if $(WORST),--worst $(WORST))

fuzz: $(STAMP)
	TPHTRAP_FUZZ=long $(PYTEST) -q tests/test_fuzz.py tests/test_engine_stateful.py tests/test_audit_attack.py -p no:cacheprovider

integration: $(STAMP)
	TPHTRAP_INTEGRATION=1 $(PYTEST) -q -s -p no:cacheprovider tests/test_acpi_integration.py

traces:
	tools/traces/record fixtures/traces

# The C client library (clients/c): C11, no dependencies. `make test` builds and runs it too.
CC      ?= cc
CFLAGS_C := -std=c11 -Wall -Wextra -Werror -pedantic -O2
c-client: build/c/libtphtrap.a build/c/test_tphtrap

build/c/libtphtrap.a: clients/c/tphtrap.c clients/c/tphtrap.h
	@mkdir -p build/c
	$(CC) $(CFLAGS_C) -c -o build/c/tphtrap.o clients/c/tphtrap.c
	ar rcs $@ build/c/tphtrap.o

build/c/test_tphtrap: clients/c/test_tphtrap.c build/c/libtphtrap.a
	$(CC) $(CFLAGS_C) -o $@ clients/c/test_tphtrap.c build/c/libtphtrap.a

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info .cache
