# qubes-sysdns-formula: set-up, demo and tests in the offline lab (Debian 12, as root).

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
LAB_CACHE ?= /var/cache/sysdns-lab

.PHONY: all deps images demo test unit lab-test clean

all: test

$(VENV_PYTHON): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $(VENV_PYTHON)

deps: $(VENV_PYTHON)
	sh tests/tools/install-host-deps.sh
	sh tests/tools/fetch-dnscrypt-proxy.sh $(LAB_CACHE)

images: deps
	$(VENV_PYTHON) -m tests.lab.images build

demo: images
	$(VENV_PYTHON) -m tests.demo

unit: deps
	$(VENV_PYTHON) -m pytest tests/unit

test: images
	$(VENV_PYTHON) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
