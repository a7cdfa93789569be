# Two entry points for a fresh machine; both create .venv on first use.
#   make demo   run `streamer ask` on the built-in tiny model and a generated video
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; on a CUDA machine pass e.g. TORCH="torch" or use an environment that has torch.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test,decord]"
	touch $@

demo: $(VENV)/.installed
	mkdir -p build
	$(BIN)/streamer make-video build/demo.mp4 --frames 64 --fps 8
	$(BIN)/streamer ask build/demo.mp4 "What happens in the video?" --frames 32 --chunk-frames 8 --json

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build
