# Interlingua: one-command set-up.  `make run` installs and serves; `make test` installs and tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install run test check proto proto-check bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Installs the package (editable) with its pinned dependencies, test, lint and codegen extras.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test,dev,codegen]'
	touch $(STAMP)

install: $(STAMP)

# Starts the service on its embedded default: ./data, gRPC :50051, metrics :9100.
run: $(STAMP)
	$(VENV)/bin/interlingua serve

test: $(STAMP)
	$(PY) -m pytest -q

# Lint, types and generated-code drift: the same script CI runs.
check: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/check

# Regenerates the protobuf/gRPC code from proto/ with the pinned grpcio-tools.
proto: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/gen-proto

proto-check: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/check-proto

bench: $(STAMP)
	$(PY) bench/search_overhead.py --data ../shared/data/debdesc/dev

clean:
	rm -rf $(VENV) build *.egg-info
