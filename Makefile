# The README's commands call these targets. One cargo profile (dev, dependencies lightly optimised)
# serves the demo, the tests and the benches, so nothing is built twice.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/debug/safepipe
VENV := .venv
PY := $(VENV)/bin/python
# PyTorch + transformers for the score benchmark's baselines only (several GB: kept out of .venv).
TORCH_VENV := .venv-torch
TORCH_PY := $(TORCH_VENV)/bin/python
# llama.cpp's Python bindings + OpenAI-compatible server (built from source, ~9 min on 2 cores; the
# wheel is cached in .cache/wheels) for `make test-server` and the generation benchmark.
LLAMA_VENV := .venv-llama
LLAMA_PY := $(LLAMA_VENV)/bin/python
LLAMA_CPP := llama-cpp-python==0.3.36

.PHONY: setup build demo test test-slow test-slurm test-server lint fmt bench classifier gpu-bundle clean help

help:
	@echo "make setup   install everything a fresh machine needs (Python venv, sample corpus, SmolLM2 model, crates)"
	@echo "make demo    run the pipeline on the bundled sample corpus (configs/demo.toml), export, train a tiny model, write the HTML report"
	@echo "make test    the test suite (needs make setup first)"
	@echo "make test-slow  slow end-to-end tests (the demo config scoring the whole sample)"
	@echo "make test-slurm  the Slurm templates under a one-node Slurm started for the test (installs slurm-wlm + munge; root or sudo)"
	@echo "make test-server  the HTTP backend against llama.cpp's server (builds llama-cpp-python once, ~9 min)"
	@echo "make lint    rustfmt check + clippy -D warnings"
	@echo "make bench   ingest, engine, tokenize and score benchmarks -> docs/BENCHMARKS.md (score: downloads PyTorch into .venv-torch)"
	@echo "make classifier  retrain the demo classifier's head (classifiers/minilm-l6-safety) on data/labels"
	@echo "make gpu-bundle  the stripped binary, xz-compressed, to carry to a GPU machine for scripts/gpu_check.sh"

setup:
	@command -v $(CARGO) >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
	@command -v npm >/dev/null || { echo "setup: npm not found; install Node.js + npm (apt-get install npm)" >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) scripts/build_sample.py --out data/sample --cache .cache/sample
	$(PY) scripts/fetch_models.py --out models --cache .cache/models
	$(PY) scripts/build_labels.py --out data/labels/safety.parquet --cache .cache/sample
	@# Debian's Chromium: the report test opens `safepipe report`'s page in it (headless).
	@command -v chromium >/dev/null || command -v apt-get >/dev/null || { echo "setup: no chromium and no apt-get; install Chromium (/usr/bin/chromium) for the report test" >&2; exit 1; }
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(CARGO) fetch --locked

build:
	$(CARGO) build --locked -p safepipe

demo: build
	$(BIN) run configs/demo.toml
	$(BIN) status configs/demo.toml
	$(BIN) sql configs/demo.toml "SELECT source, count(*) AS documents FROM documents GROUP BY source ORDER BY source"
	$(BIN) sql configs/demo.toml "SELECT source, reason, sum(records) AS records FROM quarantine GROUP BY 1, 2 ORDER BY 1, 2"
	$(BIN) sql configs/demo.toml "SELECT score, count(*) AS documents FROM scores GROUP BY score ORDER BY score"
	$(BIN) sql configs/demo.toml "SELECT d.source, s.score, count(*) AS documents FROM documents d JOIN scores s ON d.id = s.id GROUP BY 1, 2 ORDER BY 1, 2"
	$(BIN) sql configs/demo.toml "SELECT status, classifier_score, llm_score, ensemble, count(*) AS documents FROM llm_scores WHERE status <> 'not_sampled' GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
	$(BIN) sql configs/demo.toml "SELECT route, rule, also_tag, count(*) AS documents FROM routes GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
	$(BIN) sql configs/demo.toml "SELECT kind, style, count(*) AS rows, sum(CAST(keep AS INT)) AS kept, sum(completion_tokens) AS tokens FROM synthetic GROUP BY 1, 2 ORDER BY 1, 2"
	$(BIN) sql configs/demo.toml "SELECT kind, gates, count(*) AS rows FROM synthetic WHERE NOT keep GROUP BY 1, 2 ORDER BY 1, 2"
	$(BIN) sql configs/demo.toml "SELECT source, count(*) AS documents, sum(tags_inserted) AS tags, round(sum(tags_inserted) * 1.0 / sum(words - 1), 4) AS rate FROM tagged GROUP BY 1 ORDER BY 1"
	$(BIN) sql configs/demo.toml "SELECT kind, count(*) AS documents, sum(n_tokens) AS tokens, sum(tag_tokens) AS tag_tokens FROM tokens GROUP BY 1 ORDER BY 1"
	$(BIN) sql configs/demo.toml "SELECT count(*) AS sequences, sum(cardinality(input_ids)) AS tokens FROM shards"
	$(BIN) sql configs/demo.toml "SELECT s.source, count(*) AS segments FROM (SELECT unnest(sources) AS source FROM shards) s GROUP BY 1 ORDER BY 1"
	$(BIN) export megatron configs/demo.toml --out runs/demo-megatron/demo_text_document
	$(BIN) train configs/demo.toml
	$(BIN) eval configs/demo.toml --checkpoint runs/demo-checkpoints --max-prompts 6
	$(BIN) report configs/demo.toml

test:
	@test -d data/sample || { echo "test: no sample corpus; run 'make setup' first" >&2; exit 1; }
	$(CARGO) test --locked --workspace

# Slow end-to-end tests (the demo config scoring the whole sample corpus): minutes on 2 cores.
test-slow:
	@test -d data/sample || { echo "test-slow: no sample corpus; run 'make setup' first" >&2; exit 1; }
	$(CARGO) test --locked --workspace -- --ignored --skip llama_cpp_server --skip under_slurm

# The Slurm templates under a real one-node Slurm started for the test (installs slurm-wlm and
# munge from Debian's packages if missing; needs root or sudo): an array with a preempted task,
# the pack array, 2-task training; outputs equal local runs. Stops the daemons at the end.
test-slurm:
	@test -d data/sample || { echo "test-slurm: no sample corpus; run 'make setup' first" >&2; exit 1; }
	$(CARGO) build --locked -p safepipe --tests
	scripts/slurm_local.sh $(CARGO) test --locked -p safepipe --test slurm -- --ignored --nocapture

# llama-cpp-python[server] from source into .venv-llama (the built wheel is cached), then the
# test that runs `safepipe generate` and the synthesis stages against its server on 127.0.0.1.
$(LLAMA_PY):
	python3 -m venv $(LLAMA_VENV)
	ls .cache/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF" $(LLAMA_VENV)/bin/pip wheel --quiet --disable-pip-version-check --no-deps "$(LLAMA_CPP)" -w .cache/wheels
	$(LLAMA_VENV)/bin/pip install --quiet --disable-pip-version-check --find-links .cache/wheels "llama-cpp-python[server]==0.3.36"

test-server: $(LLAMA_PY)
	@test -d models/smollm2 || { echo "test-server: no model; run 'make setup' first" >&2; exit 1; }
	$(CARGO) test --locked --workspace --test llm_server -- --ignored

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	$(PY) scripts/bench_ingest.py --bin $(BIN) --out docs/BENCHMARKS.md
	$(PY) scripts/bench_engine.py --bin $(BIN) --out docs/BENCHMARKS.md
	$(PY) scripts/bench_tokenize.py --bin $(BIN) --out docs/BENCHMARKS.md
	$(PY) scripts/bench_train.py --bin $(BIN) --out docs/BENCHMARKS.md
	test -x $(TORCH_PY) || python3 -m venv $(TORCH_VENV)
	$(TORCH_PY) -m pip install --quiet --disable-pip-version-check -r requirements-torch.txt
	$(PY) scripts/bench_score.py --bin $(BIN) --out docs/BENCHMARKS.md --torch-python $(TORCH_PY)
	$(MAKE) $(LLAMA_PY)
	$(PY) scripts/bench_generate.py --bin $(BIN) --out docs/BENCHMARKS.md --llama-python $(LLAMA_PY)
	$(PY) scripts/bench_decode.py --bin $(BIN) --out docs/BENCHMARKS.md --llama-python $(LLAMA_PY)

# The demo classifier's head: embeddings of every chunk of data/labels/safety.parquet (make setup
# builds it) by the MiniLM encoder (cached per text in .cache/classifier/), 5 fold heads with a
# hidden layer, the threshold chosen out of fold per group, their average written with held-out
# metrics in metrics.json (~6 min of embedding on 2 cores, then ~1.5 min of fitting).
classifier: build
	$(BIN) classifier train --encoder models/minilm-l6/encoder.toml --data data/labels/safety.parquet \
		--out classifiers/minilm-l6-safety --name minilm-l6-safety-demo \
		--group-max-fpr request=0.08 --embeddings-cache .cache/classifier/minilm-l6-embeddings.safetensors

# The binary for a GPU machine without Rust (scripts/gpu_check.sh, docs/training.md): stripped and
# xz-compressed (~118 MB -> ~22 MB), so it fits a 64 MiB transfer.
gpu-bundle: build
	mkdir -p target/gpu-bundle
	strip -o target/gpu-bundle/safepipe $(BIN)
	xz -T0 -6 -f target/gpu-bundle/safepipe
	ls -l target/gpu-bundle/safepipe.xz

clean:
	rm -rf runs target/debug/safepipe
