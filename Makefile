# qubes-sysdns-formula: set-up, demo and tests in the offline lab (Debian 12, as root).

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# A venv's bin/python is a symlink to the interpreter it was made from, so make would
# read (and touch would change) that interpreter's time; each venv gets a stamp file.
VENV_STAMP := $(VENV)/.installed
LAB_CACHE ?= /var/cache/sysdns-lab

.PHONY: all deps images demo test unit lab-test clean bench
.PHONY: install lint matrix rpm-spec-check

all: test

$(VENV_STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $@

deps: $(VENV_STAMP)
	sh tests/tools/install-host-deps.sh
	sh tests/tools/fetch-dnscrypt-proxy.sh $(LAB_CACHE)

images: deps
	$(VENV_PYTHON) -m tests.lab.images build

demo: images
	$(VENV_PYTHON) -m tests.demo

# Benchmarks in the lab, written to docs/benchmarks.md (about 10 min on 2 cores; not
# part of `make test`). `python -m tests.bench --quick --output FILE` is a smoke run;
# BENCH_ARGS="--json FILE" also keeps the raw results.
BENCH_ARGS ?=
bench: images
	$(VENV_PYTHON) -m tests.bench --output docs/benchmarks.md $(BENCH_ARGS)

unit: deps
	$(VENV_PYTHON) -m pytest tests/unit

test: images
	$(MAKE) lint
	$(MAKE) -j2 --output-sync=target matrix
	$(VENV_PYTHON) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
	rm -rf $(LINT_VENV) $(MATRIX_DIR)

# Install the formula with the Qubes paths of a formula RPM: its own file root under
# /srv/formulas (FORMULA formula_dir), filled with FORMULA formula-files, plus a
# minion.d file adding that root to file_roots. Nothing goes under /srv/salt.
FORMULA_DIR := $(shell sed -n 's/^formula_dir: *//p' FORMULA)
FORMULA_FILES := $(shell sed -n 's/^formula-files: *//p' FORMULA)
MINION_CONF := etc/salt/minion.d/sysdns-formula.conf

install:
	test -n "$(FORMULA_DIR)" -a -n "$(FORMULA_FILES)"
	install -d $(DESTDIR)$(FORMULA_DIR)
	cp -r $(FORMULA_FILES) $(DESTDIR)$(FORMULA_DIR)/
	find $(DESTDIR)$(FORMULA_DIR) -depth -name __pycache__ -type d -exec rm -rf {} +
	install -D -m 0644 $(MINION_CONF) $(DESTDIR)/$(MINION_CONF)

# Linters, pinned in requirements-lint.txt; shellcheck and rpm come from Debian.
LINT_VENV := .venv-lint
SLS_FILES = $(shell find qubes-sysdns-formula -name '*.sls')
SHELL_SCRIPTS = $(shell find .ci tests/tools tests/lab/agent qubes-sysdns-formula -type f \
	-exec awk 'FNR == 1 && /^\#!.*[\/ ](ba|da)?sh$$/ { print FILENAME } { nextfile }' {} +)

$(LINT_VENV)/.installed: requirements-lint.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet -r requirements-lint.txt
	touch $@

lint: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/yamllint --strict .
	$(LINT_VENV)/bin/salt-lint $(SLS_FILES)
	shellcheck $(SHELL_SCRIPTS)
	$(MAKE) rpm-spec-check

# Parse the RPM spec and build the package from the working tree (tests/tools/check-rpm-spec.sh).
rpm-spec-check:
	sh tests/tools/check-rpm-spec.sh

# tests/unit under each supported Salt release, one venv per combination. Each entry is
# salt<version>-jinja<version>: the newest 3006, 3007 and 3008 releases whose
# dependencies resolve (3006.30, 3007.17 and 3008.5 require a certifi release that the
# package index lacks), and Jinja2 3.0.3 as in the Qubes 4.2 dom0 with salt 3006.9,
# the newest release whose requirements/base.txt accepts it (3006.10 and later require
# Jinja2>=3.1.5). A file requirements-matrix-<entry>.txt adds packages to one entry.
# `make test` runs two entries at a time: all four, venvs included, took 4 min 38 s on
# 2 cores with a warm pip cache while other labs ran.
MATRIX_PYTHON ?= python3.11
MATRIX_DIR := .venv-matrix
MATRIX := salt3006.29-jinja3.1.6 salt3007.16-jinja3.1.6 salt3008.4-jinja3.1.6 \
	salt3006.9-jinja3.0.3

.PRECIOUS: $(MATRIX_DIR)/%/.installed

matrix: $(MATRIX:%=matrix-%)

# HYPOTHESIS_NO_PLUGINS: salt 3006.9 puts its vendored importlib_metadata finder on
# sys.meta_path (salt/_compat.py), whose distributions make the entry-point scan that
# hypothesis runs at import fail; the tests use no hypothesis plugin.
matrix-%: $(MATRIX_DIR)/%/.installed
	HYPOTHESIS_NO_PLUGINS=1 $(MATRIX_DIR)/$*/bin/python -m pytest -q -p no:cacheprovider tests/unit

.SECONDEXPANSION:
$(MATRIX_DIR)/%/.installed: requirements-matrix.txt $$(wildcard requirements-matrix-$$*.txt)
	rm -rf $(MATRIX_DIR)/$*
	$(MATRIX_PYTHON) -m venv $(MATRIX_DIR)/$*
	$(MATRIX_DIR)/$*/bin/python -m pip install --quiet $(addprefix -r ,$^) \
		salt==$(patsubst salt%,%,$(word 1,$(subst -, ,$*))) \
		Jinja2==$(patsubst jinja%,%,$(word 2,$(subst -, ,$*)))
	touch $@
