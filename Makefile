# Run `make help` for the list of targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra Hydra overrides for `make train`, e.g. make train ARGS="data.root=PATH model.pretrained=false"
ARGS ?=
# The face detector's model file; `facemask fetch-face-model` installs it (gitignored).
FACE_MODEL := facemask/faces/models/face_detection_short_range.tflite

# MLflow, Evidently and albumentations call home on import unless told not to.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export NO_ALBUMENTATIONS_UPDATE ?= 1

.DEFAULT_GOAL := help
.PHONY: help setup train data test test-slow lint format lock mlflow-ui clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The lock is complete and hashed: pip installs exactly those files and resolves nothing.
	$(PY) -m pip install --no-deps --require-hashes -r requirements.lock
	$(PY) -m pip install --no-deps -e .
	# Fails on any broken requirement except mediapipe's opencv-contrib-python, which is left out
	# on purpose (requirements-nodeps.in).
	$(PY) scripts/pip_check.py
	touch $@

# Downloads the pinned mediapipe 0.10.21 wheel once and extracts the model from it.
$(FACE_MODEL): | $(VENV)/.installed
	$(VENV)/bin/facemask fetch-face-model

setup: $(VENV)/.installed $(FACE_MODEL) ## Create .venv, install the pinned dependencies and the face model

train: setup ## Train 5 epochs on data/raw (downloaded if empty), then register the model
	$(PY) train.py data.download=true trainer.max_epochs=5 $(ARGS)

data: setup ## Download the public development dataset into data/raw
	$(PY) scripts/download_data.py

test: setup ## Run the default test suite (slow tests excluded)
	$(PY) -m pytest

test-slow: setup ## Run only the tests marked slow (succeeds when none are marked)
	$(PY) -m pytest -m slow; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]

lint: setup ## Check formatting and lint with ruff
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: setup ## Format the code with ruff
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lock: ## Regenerate requirements.lock, with hashes, from requirements*.in in a fresh virtual environment
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --upgrade pip
	.lock-venv/bin/pip install -r requirements.in -r requirements-dev.in
	.lock-venv/bin/pip install --no-deps -r requirements-nodeps.in
	.lock-venv/bin/python scripts/pip_check.py
	# --all keeps setuptools, which torch requires at run time; pip itself is upgraded apart.
	# `sort -f` in the C locale keeps the order of the committed lock, so diffs show real changes.
	.lock-venv/bin/pip freeze --all --exclude-editable | grep -v "^pip==" | LC_ALL=C sort -f \
		> requirements.lock
	.lock-venv/bin/python scripts/add_lock_hashes.py requirements.lock
	rm -rf .lock-venv

mlflow-ui: setup ## Open the MLflow UI on the default store at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean: ## Remove caches and training run folders (keeps mlruns/, data/ and the prediction log)
	rm -rf .pytest_cache .ruff_cache logs/train .cache
