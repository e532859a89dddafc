# tnlib: every target that needs the virtual environment creates it first (make setup is idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tnlib-installed
# A GPU is present when nvidia-smi lists one; otherwise we install a CPU build of torch and run
# Triton kernels under its interpreter.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup test test-unit test-notebooks lab notebooks walkthrough quickstart data generate train-385m bench-kernels bench-varlen bench-model bench-srmsnorm bench-inference bench-fsdp1 bench-parallel bench-plans ablations clean help

# `make help` lists every target that has a `## description` on its rule line (tests/test_cli.py
# checks that every .PHONY target has one).
help: ## this list (the default target)
	@echo "usage: make TARGET [VAR=value ...]"
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
	  sed -E 's/^([a-zA-Z0-9_-]+):.*## (.*)$$/\1\t\2/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install tnlib with its tools (idempotent)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pip install -q "torch>=2.7" triton
else
	@# CPU machine: a CPU build of torch (local wheel or the CPU index), never the multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX) \
	  --timeout 15 --retries 1 || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q triton
endif
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: test-unit test-notebooks ## unit tests, then nbval over every notebook

# On a CPU the tests run in TEST_WORKERS pytest-xdist processes (default 2, for a 2-core machine: much of the
# time is single-threaded, subprocesses, the interpreter, notebook kernels; each worker runs torch on one
# thread, tests/conftest.py); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test-unit: setup ## unit tests only (Triton kernel tests under the interpreter on a CPU)
ifeq ($(HAS_GPU),1)
	$(BIN)/python -m pytest tests
else
	@# Triton kernel tests need the interpreter, which must be on before triton is imported; the rest
	@# run without it so that models use the fast PyTorch fallbacks.
	$(BIN)/python -m pytest tests -m "not triton" -n $(TEST_WORKERS)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -m triton -n $(TEST_WORKERS)
endif

test-notebooks: setup ## execute every notebook under nbval (their own assertions)
	@# notebooks that run Triton kernels switch the interpreter on themselves when there is no GPU;
	@# --dist loadfile: every cell of a notebook in one worker, in order (one kernel per notebook)
	$(BIN)/python -m pytest --nbval-lax -p no:cacheprovider notebooks $(if $(HAS_GPU),,-n $(TEST_WORKERS) --dist loadfile)

# as root (containers) JupyterLab refuses to start without --allow-root; LAB_ARGS passes anything else,
# e.g. make lab LAB_ARGS="--no-browser --ip=0.0.0.0 --port=8888"
LAB_ARGS ?=
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: setup ## JupyterLab on notebooks/ (widgets enabled; LAB_ARGS="--no-browser --port=8888" ...)
	$(BIN)/jupyter lab notebooks/ $(ROOT_ARGS) $(LAB_ARGS)

notebooks: setup ## re-execute every notebook in place; lists every one that failed
	@# every notebook is executed even when one fails; the failures are listed at the end
	@failed=""; for nb in notebooks/[0-9]*.ipynb; do \
	  echo "executing $$nb"; \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 "$$nb" || failed="$$failed $$nb"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; echo "all notebooks executed"

walkthrough: notebooks ## set up and execute the whole notebook walk-through (= notebooks)

# tiny TNL vs tiny Transformer on the shipped sample: CPU, a few minutes -> runs/quickstart/ (the committed
# example results/quickstart/ is rewritten only with QUICKSTART_ARGS="--out results/quickstart")
QUICKSTART_ARGS ?=
quickstart: setup ## tiny TNL vs tiny Transformer on the shipped sample -> runs/quickstart (CPU, minutes)
	$(BIN)/python -m tnlib quickstart $(QUICKSTART_ARGS)

# the full open corpus -> $(DATA_DIR) with a 50,272-token BPE. The corpus is the local one ($(CORPUS), with the
# eval sets beside it in $(SHARED_DATA)) when it is there; otherwise `python -m tnlib download` first fetches
# an open one of the same kind from the Hugging Face hub into $(OPEN_DATA) (English Project Gutenberg books,
# 400 MB of text, and WikiText-103; it says what and how big before downloading), prepared the same way.
# The BPE is trained on the first 300 training books unless $(BPE_50K) exists (the committed one, for identical
# tokenization). Offline with no local corpus it stops with one line naming both ways out.
SHARED_DATA ?= ../shared/data
CORPUS ?= $(SHARED_DATA)/corpus-gutenberg-*.txt.xz
OPEN_DATA ?= data/open
DATA_DIR ?= data/full
BPE_50K ?= data/tokenizer-gutenberg-50272.json
PREPARE = $(BIN)/python -m tnlib prepare --out $(DATA_DIR) --vocab-size 50272 --val-permille 10 \
  $$( [ -f $(BPE_50K) ] && echo --tokenizer $(BPE_50K) || echo --tokenizer-docs 300 ) $(FORCE)
# the eval sets of a folder laid out as ../shared/data (the download writes the same file names)
EVAL_SETS = heldout=$(1)/gutenberg-heldout.txt.xz wikitext-valid=$(1)/wikitext103-valid.txt \
  wikitext-test=$(1)/wikitext103-test.txt wikitext-detok-valid=wikitext-detok:$(1)/wikitext103-valid.txt \
  wikitext-detok-test=wikitext-detok:$(1)/wikitext103-test.txt
data: setup ## tokenize the full corpus -> data/full (local, else downloaded; FORCE=--force to redo)
	@if [ -f $(DATA_DIR)/meta.json ] && [ -z "$(FORCE)" ]; then echo "$(DATA_DIR) is prepared (FORCE=--force to redo)"; \
	elif ls -d $(CORPUS) >/dev/null 2>&1; then \
	  $(PREPARE) --corpus "$(CORPUS)" --eval $(call EVAL_SETS,$(SHARED_DATA)); \
	else $(BIN)/python -m tnlib download --out $(OPEN_DATA) --local-corpus "$(CORPUS)" && \
	  $(PREPARE) --corpus "$(OPEN_DATA)/corpus-gutenberg-*.txt.xz" --eval $(call EVAL_SETS,$(OPEN_DATA)); fi

# TNL-385M vs Transformer-385M on the same tokens (GPUs). Defaults: 400M tokens per model (about 4
# epochs of the 95M-token corpus): on one H200 ~33 min (TNL) + ~43 min (Transformer) of training steps at
# the rates measured in results/385m-80m, ~1.5 h for the pair with evaluations. NGPU>1 uses torchrun.
# Each model has its own learning rate (LR_TNL, LR_TRANSFORMER: 6e-4 for both, the rate the learning-rate
# sweep chose for each model at 20M tokens: results/385m-fair/lr-sweep.json); SEEDS="1 2" trains each
# model once per seed (the seed sets the initialisation and the data order). The final weights are scored
# on every token of every eval set (python -m tnlib evaluate -> RUN/final/evals.json).
TOKENS ?= 400000000
SEQ ?= 2048
BATCH ?= 16
ACCUM ?= 8
NGPU ?= 1
LR_TNL ?= 6e-4
LR_TRANSFORMER ?= 6e-4
SEEDS ?= 1
RUNS ?= runs/385m
EVALS := val,eval-heldout,eval-wikitext-valid,eval-wikitext-detok-valid
STEPS = $(shell echo $$(( $(TOKENS) / ($(SEQ) * $(BATCH) * $(ACCUM) * $(NGPU)) )))
LAUNCH = $(if $(filter 1,$(NGPU)),$(BIN)/python,$(BIN)/torchrun --nproc_per_node $(NGPU))
train-385m: setup data ## TNL-385M vs Transformer-385M on the same tokens (GPUs; NGPU=, TOKENS=, SEEDS=)
	@echo "training each model for $(STEPS) steps of $$(( $(SEQ) * $(BATCH) * $(ACCUM) * $(NGPU) )) tokens, seeds $(SEEDS)"
	@for seed in $(SEEDS); do for m in tnl-385m transformer-385m; do \
	  lr=$$( [ $$m = tnl-385m ] && echo $(LR_TNL) || echo $(LR_TRANSFORMER) ); out=$(RUNS)/$$m-s$$seed; \
	  resume=$$( [ -d $$out/checkpoint ] && echo --resume ); \
	  [ -f $$out/final/evals.json ] && continue; \
	  $(LAUNCH) -m tnlib train --preset $$m --data $(DATA_DIR) --out $$out $$resume --set \
	    seq_len=$(SEQ) batch_size=$(BATCH) grad_accum=$(ACCUM) lr=$$lr seed=$$seed max_steps=$(STEPS) \
	    warmup_steps=$$(( $(STEPS) / 50 + 1 )) eval_every=$$(( $(STEPS) / 20 + 1 )) eval_tokens=262144 \
	    ckpt_every=500 eval_sets=$(EVALS) compile=true || exit 1; \
	  $(BIN)/python -m tnlib evaluate --checkpoint $$out/final --data $(DATA_DIR) || exit 1; \
	done; done
	$(BIN)/python -m tnlib compare --runs $(foreach s,$(SEEDS),tnl-s$(s)=$(RUNS)/tnl-385m-s$(s) transformer-s$(s)=$(RUNS)/transformer-385m-s$(s)) \
	  --out $(RUNS)/compare --title "TNL-385M vs Transformer-385M, same tokens" \
	  --evals val eval-heldout eval-wikitext-valid eval-wikitext-detok-valid --extra tokens_budget=$(TOKENS)

# sample from a saved model: make generate CKPT=runs/quickstart/tnl-tiny/final PROMPT="It was"; the tokenizer
# is the one saved with the model (train puts the data's there) unless TOKENIZER=path/tokenizer.json is given
CKPT ?= runs/quickstart/tnl-tiny/final
TOKENIZER ?=
PROMPT ?= It was a dark and stormy night
generate: setup ## sample from a saved model: CKPT=RUN/final PROMPT="..." (TOKENIZER=...)
	$(BIN)/python -m tnlib generate --checkpoint $(CKPT) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) --prompt "$(PROMPT)"

# GPU benchmarks (benchmarks/, one script per target, helpers in benchmarks/common.py): each writes
# results/bench/<name>-<gpu>.json with provenance (command, commit, versions, date) after every row.
# They run the library's defaults; BENCH_ARGS passes anything else, e.g. BENCH_ARGS="--out $OUT --lens 2048".
BENCH_ARGS ?=
# The targets with no setup step (bench-kernels, bench-varlen, bench-plans) run on a GPU box that has only a copy of
# the tree and its own python3 (no install, no internet): .venv's python if there is one, else python3, with this
# tree first on PYTHONPATH, so that they import the tree's tnlib whether or not one is installed.
BENCH_PY = PY=$$(test -x $(BIN)/python && echo $(BIN)/python || echo python3); \
  PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $$PY
bench-model: setup ## GPU: training tokens/s of the 385M models (the library's defaults) -> results/bench
	$(BIN)/python benchmarks/bench_model.py $(BENCH_ARGS)

bench-srmsnorm: setup ## GPU: SRMSNorm kernel vs eager and compiled PyTorch -> results/bench
	$(BIN)/python benchmarks/bench_srmsnorm.py $(BENCH_ARGS)

# decode of both models through every decoder (issue 28); one part per call: BENCH_ARGS="--parts tnl --batches 1",
# the calls' files joined with --merge (results/bench/NOTES-decode.md); BENCH_ARGS="--dry-run" on a CPU;
# BENCH_ARGS="--parts prefill": TNL's prefill of 16 mixed-length prompts, padded vs packed (results/bench/NOTES-prefill.md)
bench-inference: setup ## GPU: decode ms/token, tokens/s, first call and memory, both models, every decoder -> results/bench
	$(BIN)/python benchmarks/bench_inference.py $(BENCH_ARGS)

bench-fsdp1: setup ## GPU: training tokens/s with parallel=fsdp on one rank vs the default path -> results/bench
	$(BIN)/python benchmarks/bench_fsdp1.py $(BENCH_ARGS)

# 2 processes under torchrun (it refuses with fewer than 2 GPUs); BENCH_ARGS="--parts 7b --lens 2048", "--dry-run" (CPU)
bench-parallel: setup ## 2 GPUs: DDP vs FSDP vs tensor parallelism, correctness, memory, scaling -> results/bench
	$(BIN)/torchrun --nproc_per_node 2 benchmarks/bench_parallel.py $(BENCH_ARGS)

# Lightning Attention kernels vs fla, lightning-attn, SDPA, naive (needs a GPU; no setup step, so it
# also runs on a GPU box without internet using its own python3 and carried wheels)
bench-kernels: ## GPU: Lightning Attention kernels vs fla, lightning-attn, SDPA -> results/bench
	@$(BENCH_PY) benchmarks/bench_kernels.py $(BENCH_ARGS)

# packed documents (cu_seqlens) vs the dense kernel on the same 65,536 tokens (issue 29); no setup step (as
# bench-kernels); BENCH_ARGS="--dry-run --out /tmp/x" runs it on a CPU (interpreter, tiny)
bench-varlen: ## GPU: Lightning Attention on packed documents of mixed lengths vs dense -> results/bench
	@$(BENCH_PY) benchmarks/bench_varlen.py $(BENCH_ARGS)

# the launch plans per GPU family on an H100/H200 (issue 31): Hopper's defaults before/after, the smaller
# GPUs' plans forced (kernel tests, timings, training steps); ~4 min, no setup step (as bench-kernels)
bench-plans: ## GPU (Hopper): the per-GPU launch plans checked and timed -> results/bench
	@$(BENCH_PY) benchmarks/bench_plans.py $(BENCH_ARGS)

clean: ## remove .venv and caches
	rm -rf $(VENV) .pytest_cache **/__pycache__

# the paper's ablation tables at small scale (configs/ablations.toml; resumable) -> results/ablation/
ABL_SPEC ?= configs/ablations.toml
ABL_PARALLEL ?= 1
ablations: setup data ## the paper's ablation tables at small scale -> results/ablation (GPU; resumable)
	$(BIN)/python -m tnlib sweep $(ABL_SPEC) --data $(DATA_DIR) --parallel $(ABL_PARALLEL)
