# Two commands from a fresh clone: `make bench` (the main job) and `make test` (the whole suite).
# Each sets up what it needs first: .venv (gdscache + test deps), and for tests .venv-vllm (vLLM CPU).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BENCH_PATH ?= $(CURDIR)/.bench

.PHONY: setup setup-vllm bench test clean

$(BIN)/gdscache: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	@touch $@

setup: $(BIN)/gdscache

setup-vllm: setup
	bash scripts/setup_vllm_env.sh

bench: setup
	$(BIN)/gdscache bench --path $(BENCH_PATH)

test: setup setup-vllm
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) .venv-vllm .bench .models build *.egg-info
