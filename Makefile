# aimkp developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.aimkp-installed

.PHONY: setup demo test lint format bench clean

# Creates the virtual environment, installs the local CPU build of torch only when torch is missing,
# then builds and installs aimkp (editable, with the C++/CUDA extension) and its extras.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q "setuptools>=64" wheel "pybind11>=2.11" numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[train,test,bench,data]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: a short AimKP training of a tiny preset on the embedded default data (CPU, a few
# minutes), printing the trained model's test scores next to an untrained model's and a
# majority-keyphrase baseline's, then the robustness table (clean / text-only / image-only).
demo: setup
	OMP_NUM_THREADS=2 $(BIN)/aimkp train --preset tiny-llava --data default --output runs/demo --quick
	OMP_NUM_THREADS=2 $(BIN)/aimkp evaluate --checkpoint runs/demo/best --data default \
		--output runs/demo/eval --max-samples 250 --settings clean,text_only,image_only

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/pytest -q -p no:cacheprovider

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/bench_masked_embedding.py
	$(BIN)/python benchmarks/bench_grad_gram.py
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf build dist *.egg-info aimkp/_C*.so $(VENV)
