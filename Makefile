# gemma4-mlx developer entry points.  `make run` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MODEL: a checkpoint folder or HF repo id; empty = a cached/reachable Gemma 4 E2B-it,
# else the embedded demo model.  PROMPT: empty = interactive chat.
MODEL ?=
PROMPT ?=

.PHONY: install install-test run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

run: install
	$(BIN)/gemma4-mlx chat $(if $(MODEL),--model "$(MODEL)") $(if $(PROMPT),--prompt "$(PROMPT)")

# The OpenAI/Anthropic-compatible local server (MODEL as for run; PORT, default 8080).
.PHONY: serve
PORT ?= 8080
serve: install
	$(BIN)/gemma4-mlx serve $(if $(MODEL),--model "$(MODEL)") --port $(PORT)

# Form and structure: ruff (lint + format) and the import-layering contracts (pyproject.toml).
.PHONY: lint format
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# pytest exits 5 when it collects no test (e.g. everything deselected): say so, don't fail.
test: install-test lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: install-test
	$(BIN)/python bench/bench_text.py

# Speculative decoding (MTP drafter): cost curves, B x K grid, "auto"; ~60 min on 2 CPU cores (every timed
# cell the fastest of 2 runs; 34 min with --runs 1). BENCH_SPEC_ARGS: e.g. --quick (tiny shapes, < 1 min),
# --runs 1, or --out bench/RESULTS-speculative-cpu.txt
.PHONY: bench-spec
BENCH_SPEC_ARGS ?=
bench-spec: install-test
	$(BIN)/python bench/bench_speculative.py $(BENCH_SPEC_ARGS)

# Vision + audio encoders vs mlx-vlm 0.7.10's Gemma 4 (same weights, same process); ~10 min on 2 CPU
# cores.  mlx-vlm pulls heavy dependencies, so it runs from its own venv VLM_VENV (built on first use;
# installing gemma4-mlx there brings mlx[cpu] on Linux).  BENCH_MEDIA_ARGS: e.g. --quick (2 layers
# per tower, < 1 min) or --out bench/RESULTS-media-cpu.txt
.PHONY: bench-media
VLM_VENV ?= bench/_work/vlm-venv
BENCH_MEDIA_ARGS ?=

$(VLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLM_VENV)
	$(VLM_VENV)/bin/pip install -q --upgrade pip
	$(VLM_VENV)/bin/pip install -q mlx-vlm==0.7.10
	$(VLM_VENV)/bin/pip install -q -e .
	touch $@

bench-media: $(VLM_VENV)/.installed
	$(VLM_VENV)/bin/python bench/bench_media.py $(BENCH_MEDIA_ARGS)

# The server under concurrent clients vs mlx_lm.server, same weights (issue #13); ~25 min on 2 CPU cores.
# BENCH_SERVE_ARGS: e.g. --quick (small shapes, < 5 min) or --out bench/RESULTS-serve-cpu.txt
.PHONY: bench-serve
BENCH_SERVE_ARGS ?=
bench-serve: install-test
	$(BIN)/python bench/bench_serve.py $(BENCH_SERVE_ARGS)

# The batching scheduler with and without the drafter, in process (no HTTP): K chosen per round, tok/s; ~1 min
.PHONY: bench-sched-drafter
bench-sched-drafter: install-test
	$(BIN)/python bench/bench_sched_drafter.py

# The ragged speculative commit: in-place row copies vs the gather they replaced; ~1 min
.PHONY: bench-commit
bench-commit: install-test
	$(BIN)/python bench/bench_commit.py

# Quantized KV caches (issue #17): bytes, fits-on-a-Mac, quality, decode speed, 32K prefill peaks
# (~2 h on 2 CPU cores in full).  BENCH_KV_ARGS: e.g. --quick, or --skip speed prefill
.PHONY: bench-kv
BENCH_KV_ARGS ?=
bench-kv: install-test
	$(BIN)/python bench/bench_kv.py $(BENCH_KV_ARGS)

# Quantized products on the CPU: MLX's kernel vs the dequantized path, per mode and row count
.PHONY: bench-qlinear
BENCH_QLINEAR_ARGS ?=
bench-qlinear: install-test
	$(BIN)/python bench/bench_quantized_linear.py $(BENCH_QLINEAR_ARGS)

# One sampled row's cost on a 262,144-token vocabulary, ours vs mlx-lm's sampler (~1 min)
.PHONY: bench-sampling
bench-sampling: install-test
	$(BIN)/python bench/bench_sampling.py

# One constrained row's cost per step under an agent's tool grammar (Codex's apply_patch), ~1 min
.PHONY: bench-agent-steps
bench-agent-steps: install-test
	$(BIN)/python bench/bench_agent_steps.py

# One batched decode step (B = 1/4/8) on bench-serve's checkpoints vs mlx-lm, with its FLOP rate
# against the best GEMM rate: what bounds a server's throughput at concurrency B (~10 min).
.PHONY: bench-batch
BENCH_BATCH_ARGS ?=
bench-batch: install-test
	$(BIN)/python bench/bench_batch_decode.py $(BENCH_BATCH_ARGS)

# Our cblas_sgemm vs OpenBLAS's on 1-32-row products (--rows), a weight in L2 (hot) and out of cache (cold),
# MLX's 8-byte offset; BENCH_SGEMM_ARGS: e.g. --against /tmp/old_shim.c (another version, same process) (~3 min).
.PHONY: bench-sgemm
BENCH_SGEMM_ARGS ?=
bench-sgemm: install-test
	$(BIN)/python bench/bench_sgemm_shim.py $(BENCH_SGEMM_ARGS)

# What one small op costs on this backend, and a thin model's decode step split into graph building and
# evaluation (~1 min).
.PHONY: bench-ops
bench-ops: install-test
	$(BIN)/python bench/bench_op_cost.py

clean:
	rm -rf $(VENV) build *.egg-info bench/_work

# Resident memory of E2B/E4B/26B-A4B/31B in BF16, SFP8 and Q4_0 next to Google's table (issue #3);
# ~37 min on 2 CPU cores, needs ~35 GB free disk.  BENCH_MEMORY_ARGS: e.g. --variants e2b --formats q4_0
# Distributed (issue #18): traffic, per-rank memory, local-ring latency, N=1 vs N=2, TB5 projection.
# BENCH_DIST_ARGS: --quick (no 2-layer 31B, < 1 min) or --out bench/RESULTS-distributed-cpu.txt
.PHONY: bench-distributed
BENCH_DIST_ARGS ?=
bench-distributed: install-test
	$(BIN)/python bench/bench_distributed.py $(BENCH_DIST_ARGS)

.PHONY: bench-memory
BENCH_MEMORY_ARGS ?=
bench-memory: install-test
	$(BIN)/python bench/bench_memory.py $(BENCH_MEMORY_ARGS)

# Property-based fuzzing of the parsers and readers (tests/test_fuzz_*.py) with the long
# hypothesis profile: random seeds, 50x the CI examples (docs/hardening.md §4).
.PHONY: fuzz
fuzz: install-test
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_*.py

# Chat soak on the embedded demo model, with and without its drafter (docs/hardening.md §5).
# SOAK_ARGS: e.g. --turns 40
.PHONY: soak
SOAK_ARGS ?=
soak: install-test
	$(BIN)/python bench/soak_chat.py $(SOAK_ARGS)
