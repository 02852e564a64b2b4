# Read-only checks (what CI runs) and mutating fixes. `make help` lists the targets.
CARGO ?= cargo
SHARED_CASES ?= ../shared/cases

.PHONY: help check fmt-check clippy test cases-check fix bench deny

help:
	@echo "make check   - format check, clippy (warnings are errors), tests, golden-case sync (what CI runs)"
	@echo "make test    - the test suites only"
	@echo "make fix     - apply rustfmt and clippy's automatic fixes"
	@echo "make bench   - benchmarks (figures against same-run baselines)"
	@echo "make deny    - cargo-deny licence and advisory checks (needs cargo-deny)"

check: cases-check fmt-check clippy test

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
