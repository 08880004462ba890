# aimkp developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.aimkp-installed

.PHONY: setup demo test lint docs format bench gpu-wheels gpu-check clean

# Creates the virtual environment, installs the local CPU build of torch only when torch is missing,
# then builds and installs aimkp (editable, with the C++/CUDA extension) and its extras.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q "setuptools>=64" wheel "pybind11>=2.11" numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[train,test,bench,data,docs]"
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

test: setup lint docs
	$(BIN)/mypy aimkp
	$(BIN)/pytest -q -p no:cacheprovider

# The documentation site (docs/, mkdocs.yml) into the ignored site/: --strict fails on a broken
# link or anchor and on a page left out of the nav. No -q: mkdocs 1.6 does not count the warnings
# it does not print, so -q would let --strict pass.
docs: setup
	$(BIN)/mkdocs build --strict -d site

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark at full size (results and plots under benchmarks/results/); `aimkp bench all
# --quick` is the short version (benchmarks/results/quick/).
bench: setup
	$(BIN)/aimkp bench all

# Wheels the GPU machine lacks (Python 3.12 there; it has their dependencies: click, joblib, regex,
# tqdm, numpy, scipy, opt-einsum), into the ignored .whl/ that travels with the checkout.
GPU_WHEELS ?= nltk==3.10.4 opacus==1.6.0
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# Everything a GPU shows in 8.5 minutes (one H100 / H200; a 15-minute lease keeps >= 3 spare):
# carried wheels, the sm_90 build, CUDA tests, compute-sanitizer, the benchmarks' GPU configs;
# OUT/gpu_check.json says what ran, the last lines what to commit (benchmarks/results/gpu/).
# Without CUDA every GPU step is skipped (exit 0). The project's .venv python where it exists,
# else $(PYTHON) (the GPU machine's python3 has torch). ARCHIVE=FILE also packs OUT into a .tar.gz.
OUT ?= gpu-check-out
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out $(OUT) $(if $(ARCHIVE),--archive $(ARCHIVE))

clean:
	rm -rf build dist site *.egg-info aimkp/_C*.so $(VENV)
