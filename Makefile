# Interlingua: one-command set-up.  `make run` installs and serves; `make test` installs and tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install run test check proto proto-check bench clean reliability etcd

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Installs the package (editable) with its pinned dependencies, test, lint, codegen and milvus extras
# (the milvus backend's tests run on Milvus Lite).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test,dev,codegen,milvus]'
	touch $(STAMP)

install: $(STAMP)

# Starts the service on its embedded default: ./data, gRPC :50051, metrics :9100.
run: $(STAMP)
	$(VENV)/bin/interlingua serve

# tests/test_shared_registry.py runs a real etcd: Debian's etcd-server, installed here where the
# machine allows it (root or password-less sudo, apt); otherwise those tests skip with the reason.
etcd:
	@command -v etcd >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  command -v apt-get >/dev/null 2>&1 && \
	  ( DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq etcd-server >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq etcd-server >/dev/null 2>&1; } ) ; \
	  command -v etcd >/dev/null 2>&1 || echo "etcd not installed: the shared-registry tests will skip"; }

test: $(STAMP) etcd
	$(PY) -m pytest -q

# Issue 10's reliability suite (tests/reliability, ~25 min with the default 600 s soak; see
# docs/RELIABILITY.md): SIGKILLs during ingest, route swaps, fuzzing, bad index specs, a soak and an
# unauthenticated flood, against server subprocesses. Its last line is one JSON object of results.
SOAK_SECONDS ?= 600
reliability: $(STAMP)
	$(PY) -m tests.reliability --soak-seconds $(SOAK_SECONDS)

# Lint, types and generated-code drift: the same script CI runs.
check: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/check

# Regenerates the protobuf/gRPC code from proto/ with the pinned grpcio-tools.
proto: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/gen-proto

proto-check: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/check-proto

# The benchmarks' own extra (plots, Chroma, Milvus Lite): installed here, never by run/test.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PIP) install --quiet -e '.[test,dev,codegen,milvus,bench]'
	touch $(BENCH_STAMP)

DATA ?= ../shared/data/debdesc
bench: $(BENCH_STAMP)
	$(PY) bench/search_overhead.py --data $(DATA)/dev
	$(PY) bench/transform_overhead.py --data $(DATA)
	$(PY) bench/peers.py --data $(DATA)/dev --n 1000000 --plot docs/peers_qps_recall.png

clean:
	rm -rf $(VENV) build *.egg-info
