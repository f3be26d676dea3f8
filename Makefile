# dicom-ai-node: the two commands a newcomer needs.
#   make run    set up everything, start a local Orthanc and the node
#   make test   set up everything and run the whole test suite
# Both install the Debian packages they need (orthanc, orthanc-dicomweb,
# dcmtk, dicom3tools) with apt-get and create the virtual environment.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools
CONFIG ?= config/node.toml

.PHONY: run test setup system-packages venv orthanc bench clean

setup: system-packages venv

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

# torch first, pinned: 2.13.0 is a CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# A local Orthanc (the PACS the default configuration sends results to).
orthanc: system-packages
	@mkdir -p var/orthanc
	@if curl -sf http://127.0.0.1:8042/system >/dev/null; then echo "Orthanc already up on :8042"; else \
	  (cd . && nohup Orthanc deploy/orthanc/orthanc.json >var/orthanc/orthanc.log 2>&1 &) ; \
	  for i in $$(seq 50); do curl -sf http://127.0.0.1:8042/system >/dev/null && break; sleep 0.2; done; \
	  echo "Orthanc up: http://127.0.0.1:8042 (DICOM ORTHANC@127.0.0.1:4242)"; fi

run: setup orthanc
	$(VENV)/bin/ainode serve --config $(CONFIG)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/ingest.py

clean:
	rm -rf var
