# Two entry points for a fresh machine; both create .venv on first use.
#   make demo   stream a generated video through an in-process server on the built-in model
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; on a CUDA machine pass e.g. TORCH="torch" or use an environment that has torch.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

OLDEST := .venv-oldest
.PHONY: demo test test-oldest clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test,decord]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/streamer demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# the suite on the oldest transformers pyproject.toml allows (CI runs the newest)
test-oldest:
	$(MAKE) VENV=$(OLDEST) $(OLDEST)/.installed
	$(OLDEST)/bin/pip install --disable-pip-version-check -q "transformers==5.18.0"
	$(OLDEST)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(OLDEST) build
