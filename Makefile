# The few verbs a newcomer needs. Every target sets up the local environment first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a photo of an astronaut riding a horse on the moon
MODEL ?= $(or $(FLASHSD_MODEL),sdxl)
export FLASHSD_MODEL := $(MODEL)

# A training's tar, as a model version made from the training gets it (Cog's COG_WEIGHTS): `make serve` passes the
# variable to the server, whose setup() reads it; `make predict` and `make demo` give it to the command line.
TRAINED = $(if $(COG_WEIGHTS),--trained-weights "$(COG_WEIGHTS)")

.PHONY: setup test test-quick lint format predict demo serve schema weights bench train train-demo serve-train

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

predict: setup  ## one prediction with the real weights (fetched on first use) into outputs/ (COG_WEIGHTS=<a training's tar>: with its LoRA)
	$(BIN)/python -m flashsd predict -i prompt="$(PROMPT)" $(if $(INPUTS),$(foreach i,$(INPUTS),-i $(i))) $(TRAINED)

demo: setup  ## the same prediction on tiny random weights: shows the whole path on any laptop, offline
	$(BIN)/python -m testkit.tiny_repos weights-tiny
	FLASHSD_WEIGHTS=weights-tiny $(BIN)/python -m flashsd predict -i prompt="$(PROMPT)" -i aspect_ratio=custom -i width=256 -i height=256 --output-dir outputs/demo $(TRAINED)

train: setup  ## train a style LoRA on IMAGES (a zip or tar of images) with the real weights: the tar goes to outputs/
	$(BIN)/python -m flashsd train -i input_images="$(IMAGES)" $(if $(INPUTS),$(foreach i,$(INPUTS),-i $(i)))

train-demo: setup  ## a short training on tiny random weights and a drawn image set: the whole path, offline
	$(BIN)/python -m testkit.tiny_repos weights-tiny $(MODEL)
	$(BIN)/python -m testkit.training_sets outputs/demo-images.zip
	FLASHSD_WEIGHTS=weights-tiny $(BIN)/python -m flashsd train -i input_images=outputs/demo-images.zip -i steps=10 -i resolution=256 -i seed=1 --output-dir outputs/train-demo

serve-train: setup  ## the Cog HTTP server in train mode on 127.0.0.1:5000 (POST /trainings), as Replicate runs trainings
	PATH="$(CURDIR)/$(BIN):$$PATH" COG_TRAIN_TYPE_STUB=train.py:train PORT=5000 \
		$(BIN)/python -m cog.server.http --host 127.0.0.1 --x-mode train

schema: setup  ## regenerate .cog/openapi_schema.json from predict.py and train.py
	$(BIN)/python scripts/openapi-schema

serve: setup  ## the Cog HTTP server on 127.0.0.1:5000, as in the container (4 predictions at once, as @concurrent says; COG_WEIGHTS=<a training's tar>: serving it)
	PATH="$(CURDIR)/$(BIN):$$PATH" COG_PREDICT_TYPE_STUB=predict.py:Predictor COG_MAX_CONCURRENCY=4 PORT=5000 \
		$(BIN)/python -m cog.server.http --host 127.0.0.1

weights: setup  ## fetch the weights of MODEL into weights/
	$(BIN)/python scripts/download-weights --model $(MODEL)

bench: setup  ## benchmarks: prints a table and writes bench/results/*.json
	$(BIN)/python -m bench.run
