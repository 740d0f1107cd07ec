# Two commands on a fresh machine: `make crossvalidate` (the main job) and `make test`.
# Both create .venv first: torch is installed alone and pinned (an unpinned torch pulls a
# multi-GB CUDA build), then the project with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

DATA ?= device_1
PRESETS := per_model feature_strategy_ablation weighting_ablation predictors
# SEEDS=5: every cell over 5 seeds (mean ± sd, significance marks; tables <preset>_k5.*)
SEEDS ?=
SEED_ARGS := $(if $(SEEDS),seeds=$(SEEDS))

.PHONY: setup crossvalidate test lint benchmark tables docs mlflow-ui serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

crossvalidate: setup  ## leave-one-model-out CV of the IrEne config on device 1, logged to MLflow
	$(PY) run.py stage=crossvalidate $(ARGS)

# no bytecode caches or pytest cache: `make test` leaves `git status --ignored` as it was
test: setup  ## the whole test suite (slow CLI tests included)
	PYTHONDONTWRITEBYTECODE=1 $(PY) -m pytest -q -p no:cacheprovider $(ARGS)

lint: setup
	$(VENV)/bin/ruff check irene pipelines tests scripts run.py

benchmark: setup
	$(PY) scripts/benchmark_main_job.py --repeats 5
	$(PY) scripts/benchmark_crossvalidation.py --repeats 5
	$(PY) scripts/benchmark_sweeps.py --repeats 2

tables: setup  ## every paper table of a device from nothing: sweeps (parallel, resumable) + reports
	@for preset in $(PRESETS); do \
	  $(PY) run.py -m experiment=$$preset data=$(DATA) hydra/launcher=joblib $(SEED_ARGS) $(ARGS) || exit 1; \
	  $(PY) run.py stage=report experiment=$$preset data=$(DATA) $(SEED_ARGS) $(ARGS) || exit 1; \
	done; echo "tables: outputs/tables/$(DATA)/"

OUT = $(or $(IRENE_OUTPUTS),outputs)
WHATIF = 'models=[bert-base-uncased,distilbert-base-uncased,bert-large-uncased]' 'batch_sizes=[8,16,32]' 'seq_lens=[64,128,256]'
docs: tables  ## regenerate every results table in README.md and docs/ from fresh runs
	$(PY) run.py stage=whatif $(WHATIF) run_dir=$(OUT)/runs/docs-whatif $(ARGS)
	cp $(OUT)/runs/docs-whatif/whatif_energy.md $(OUT)/tables/$(DATA)/whatif.md
	$(PY) scripts/update_docs.py --tables $(OUT)/tables

# the venv's bin first on PATH: mlflow starts uvicorn/gunicorn from there
VENV_PATH = PATH="$(abspath $(VENV))/bin:$$PATH"
STORE = sqlite:///$(abspath $(OUT))/mlflow.db

mlflow-ui: setup  ## browse the local store: prints (and opens) the address of the runs table
	$(VENV_PATH) $(PY) scripts/mlflow_ui.py --store $(STORE) --port 5000

PORT ?= 5001
serve: setup  ## serve a packaged predictor: make serve MODEL=models:/<id> (printed by stage=predict ... package=true)
	@test -n "$(MODEL)" || { echo "usage: make serve MODEL=models:/<id>  (stage=predict ... package=true prints it)"; exit 2; }
	$(VENV_PATH) MLFLOW_TRACKING_URI=$(STORE) $(PY) -m irene.serving \
	  -m "$(MODEL)" --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf outputs/runs outputs/multirun outputs/cache
