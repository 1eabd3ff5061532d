# The few verbs a newcomer needs. Every target sets up the local environment first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a photo of an astronaut riding a horse on the moon
MODEL ?= $(or $(FLASHSD_MODEL),sdxl)
export FLASHSD_MODEL := $(MODEL)

.PHONY: setup test test-quick lint format predict demo serve schema weights bench

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .  # flashsd, testkit, bench importable from anywhere
	touch $@

setup: $(VENV)/.installed

test: setup  ## the whole test suite (CPU, no network)
	$(BIN)/python -m pytest

test-quick: setup  ## the suite without the slow tier (compiled mode, benchmark code): for development
	$(BIN)/python -m pytest -m "not slow"

lint: setup  ## ruff: lint and format check (CI runs it)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## ruff: fix what can be fixed and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

predict: setup  ## one prediction with the real weights (fetched on first use) into outputs/
	$(BIN)/python -m flashsd predict -i prompt="$(PROMPT)" $(if $(INPUTS),$(foreach i,$(INPUTS),-i $(i)))

demo: setup  ## the same prediction on tiny random weights: shows the whole path on any laptop, offline
	$(BIN)/python -m testkit.tiny_repos weights-tiny
	FLASHSD_WEIGHTS=weights-tiny $(BIN)/python -m flashsd predict -i prompt="$(PROMPT)" -i aspect_ratio=custom -i width=256 -i height=256 --output-dir outputs/demo

schema: setup  ## regenerate .cog/openapi_schema.json from predict.py
	$(BIN)/python scripts/openapi-schema

serve: setup  ## the Cog HTTP server on 127.0.0.1:5000, as in the container (4 predictions at once, as @concurrent says)
	PATH="$(CURDIR)/$(BIN):$$PATH" COG_PREDICT_TYPE_STUB=predict.py:Predictor COG_MAX_CONCURRENCY=4 PORT=5000 \
		$(BIN)/python -m cog.server.http --host 127.0.0.1

weights: setup  ## fetch the weights of MODEL into weights/
	$(BIN)/python scripts/download-weights --model $(MODEL)

bench: setup  ## benchmarks: prints a table and writes bench/results/*.json
	$(BIN)/python -m bench.run
