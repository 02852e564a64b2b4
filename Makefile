# Read-only checks (what CI runs) and mutating fixes. `make help` lists the targets.
CARGO ?= cargo
SHARED_CASES ?= ../shared/cases

.PHONY: help check fmt-check clippy test cases-check fix bench deny fuzz fuzz-check manifests-check

help:
	@echo "make check   - format check, clippy (warnings are errors), tests, golden-case sync (what CI runs)"
	@echo "make test    - the test suites only"
	@echo "make fix     - apply rustfmt and clippy's automatic fixes"
	@echo "make bench   - benchmarks (figures against same-run baselines)"
	@echo "make deny    - cargo-deny licence and advisory checks (needs cargo-deny)"
	@echo "make fuzz    - coverage-guided fuzzing of the decoders (needs cargo-fuzz; node/fuzz/README.md)"
	@echo "make fuzz-check - format check and clippy of the fuzz targets (no fuzzing; part of make check)"
	@echo "make manifests-check - the Kubernetes manifests against the API's schemas, the compose file (needs python3 and PyPI; CI runs it)"

check: cases-check fmt-check clippy fuzz-check test

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test:
	$(CARGO) test --workspace --locked

# The golden cases are vendored byte for byte; where the shared originals exist, they must match.
cases-check:
	@if [ -d "$(SHARED_CASES)" ]; then \
		diff -r "$(SHARED_CASES)" rules/tests/cases && echo "golden cases match $(SHARED_CASES)"; \
	else \
		echo "no $(SHARED_CASES) here: using the vendored golden cases"; \
	fi

fix:
	$(CARGO) fmt --all
	$(CARGO) clippy --workspace --all-targets --fix --allow-dirty --allow-staged

# Every figure of docs/benchmarks.md, each against a baseline measured in the same run: the
# in-process pipeline (criterion), then the load generator's driver, which starts real `tollgate`
# processes and the no-op sink and repeats all `bench` lines in a summary at the end.
BENCH_TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

bench:
	$(CARGO) build --release -p tollgate --bins
	mkdir -p $(BENCH_TARGET_DIR)/bench
	bash -o pipefail -c '$(CARGO) bench -p tollgate-rules --bench pipeline | tee $(BENCH_TARGET_DIR)/bench/pipeline.txt'
	$(BENCH_TARGET_DIR)/release/tollgate-loadgen bench --pipeline-output $(BENCH_TARGET_DIR)/bench/pipeline.txt

deny:
	$(CARGO) deny check

# Fuzzing (node/fuzz/README.md): its own workspace, built by cargo-fuzz with libFuzzer's flags.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= otlp_metrics otlp_logs otlp_json stored
FUZZ_MANIFEST = node/fuzz/Cargo.toml

fuzz:
	cd node/fuzz && $(CARGO) run --release --locked --bin seeds
	cd node/fuzz && for target in $(FUZZ_TARGETS); do \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none -O $$target -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -max_len=65536 || exit 1; \
	done

# The fuzz crate checked like the workspace, in the workspace's target directory (it shares most
# of its dependencies' builds).
fuzz-check:
	$(CARGO) fmt --manifest-path $(FUZZ_MANIFEST) -- --check
	$(CARGO) clippy --manifest-path $(FUZZ_MANIFEST) --target-dir target --all-targets --locked -- -D warnings

# The Kubernetes manifests against the Kubernetes API's schemas, strictly (an unknown or
# misplaced field is an error), with kubernetes-validate from PyPI in a venv under target/; the
# compose file with docker-compose where it is installed. Custom kinds (Kustomization,
# PodMonitor) have no schema there and are only warned about.
MANIFESTS_VENV ?= $(BENCH_TARGET_DIR)/manifests-venv
KUBERNETES_VALIDATE ?= kubernetes-validate==1.37.0

manifests-check:
	@test -x $(MANIFESTS_VENV)/bin/kubernetes-validate || \
		(python3 -m venv $(MANIFESTS_VENV) && $(MANIFESTS_VENV)/bin/pip install -q $(KUBERNETES_VALIDATE))
	$(MANIFESTS_VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml
	@echo "deploy/k8s: every manifest valid"
	@if command -v docker-compose >/dev/null 2>&1; then \
		docker-compose -f deploy/docker-compose.yml config -q && echo "deploy/docker-compose.yml: valid"; \
	else \
		echo "docker-compose not installed: deploy/docker-compose.yml not checked"; \
	fi
