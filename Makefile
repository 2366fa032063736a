# Two commands on a fresh machine: `make run` serves, `make test` tests. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test install model-repository bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e '.[core,test]'
	# Used only for a data file (the CLIP vocabulary) and the bundled tritonserver binary:
	# their declared dependencies (torchvision, timm, ...) must not be installed.
	$(PY) -m pip install -q -c constraints.txt --no-deps open-clip-torch nvidia-pytriton
	touch $@

install: $(STAMP)

# The embedded default: tiny seeded SDXL -> ONNX -> python-ort repository (ONNX cached in build/).
model-repository: install
	$(PY) -m export default

run: model-repository
	exec $(PY) -m frontend $(ARGS)

test: model-repository
	$(PY) -m pytest $(PYTEST_ARGS)

bench: model-repository
	$(PY) -m tests.benchmarks.bench_text_to_image --repeats 3 $(ARGS)

clean:
	rm -rf build outputs
