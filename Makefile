# dicom-ai-node: the two commands a newcomer needs.
#   make run    set up everything, start a local Orthanc and the node
#   make test   set up everything and run the whole test suite
# Both install the Debian packages they need (orthanc, orthanc-dicomweb,
# dcmtk, dicom3tools, prometheus for promtool) with apt-get and create the
# virtual environment.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools prometheus redis-server rabbitmq-server docker-compose
CONFIG ?= config/node.toml

.PHONY: run test lint setup system-packages venv orthanc bench clean viewer viewer-deps browser-deps

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

test: setup viewer-deps browser-deps lint
	$(PY) -m pytest

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and mypy, as
# set in pyproject.toml; any finding fails the build. It never reformats.
lint: venv
	$(VENV)/bin/ruff check node pipelines models tests bench deploy
	$(VENV)/bin/mypy

# OHIF viewer: the prebuilt dist of the npm package @ohif/app (about 50 MB
# packed, 200 MB unpacked), fetched once into .cache/ (not committed) and
# served at / by deploy/ohif/viewer.py, which proxies /dicom-web to Orthanc.
OHIF_VERSION := $(shell cat deploy/ohif/ohif-version)
OHIF_DIR := .cache/ohif/$(OHIF_VERSION)
ORTHANC_URL ?= http://127.0.0.1:8042
VIEWER_PORT ?= 3000

viewer-deps: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html: deploy/ohif/ohif-version
	@command -v npm >/dev/null || { echo "installing npm"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq npm; }
	rm -rf $(OHIF_DIR) && mkdir -p $(OHIF_DIR)
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	tar -xzf $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIR) --strip-components=1 package/dist
	rm $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz
	touch $@

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser-deps:
	@command -v chromium >/dev/null || { echo "installing chromium"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# Review the node's results in OHIF: http://127.0.0.1:$(VIEWER_PORT)/
viewer: setup viewer-deps orthanc
	$(PY) deploy/ohif/viewer.py --dist $(OHIF_DIR)/dist --orthanc $(ORTHANC_URL) --port $(VIEWER_PORT)

bench: setup
	$(PY) bench/ingest.py

clean:
	rm -rf var
