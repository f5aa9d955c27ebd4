# The two commands of the README:  `make run` (the guard) and `make test` (the whole suite).
# Everything else they need is installed here, into .venv and .cache/ (both ignored by git).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# constraints.txt pins the tested set of every dependency; the Dockerfile and CI (`make test`) install with it too.
CONSTRAINTS := -c constraints.txt

.PHONY: run test lint typecheck unit integration bench broker-start broker-stop clean constraints clients

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[worker,test]'
	@# The wheel holds `byzguard` only; the worker (app, agents, tables, topics) runs from this checkout.
	$(PY) -c 'import sysconfig; open(sysconfig.get_path("purelib") + "/byzguard-checkout.pth", "w").write("$(CURDIR)\n")'
	touch $(INSTALLED)

## constraints: pin the current venv's packages as the tested set (after changing pyproject.toml's dependencies)
constraints: $(INSTALLED)
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

## run: the guard worker (starts the local Kafka broker when BYZGUARD_BROKER is unset)
run: $(INSTALLED)
	$(VENV)/bin/byzguard run

## test: lint, type check, and the whole suite against a real broker
test: $(INSTALLED) lint typecheck
	$(PY) -m app.dev.localkafka fetch
	@# The e2e tests drive Debian's Chromium; CI is a fresh machine where we are root.
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi
	@# promtool (Debian's prometheus package) checks the /metrics exposition and unit-tests the alerting rules.
	@if ! command -v promtool >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; fi
	-$(MAKE) -s clients   # a client it cannot install fails its tests, saying so
	$(VENV)/bin/pytest -q -p no:cacheprovider

## clients: the users' clients the tests produce with: kcat (Debian's package, with apt-get when we are root) and
## the TypeScript producer of tests/clients/ts (npm ci, tsc); their tests fail, naming this step, without them
TS_PRODUCER := tests/clients/ts/dist/producer.js
clients: $(TS_PRODUCER)
	@if ! command -v kcat >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat; fi

$(TS_PRODUCER): tests/clients/ts/producer.ts tests/clients/ts/package.json tests/clients/ts/package-lock.json tests/clients/ts/tsconfig.json
	cd tests/clients/ts && npm ci --no-audit --no-fund --loglevel=error && npx --no-install tsc -p .
	touch $@

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

typecheck: $(INSTALLED)
	$(VENV)/bin/mypy

unit: $(INSTALLED)
	$(VENV)/bin/pytest -q tests/unit

integration: $(INSTALLED)
	$(VENV)/bin/pytest -q tests/integration

## bench: throughput, latency, memory, crash accounting, detection quality and a profile on a local broker, into bench/results/ (BENCH_ARGS=--quick: a smoke run)
bench: $(INSTALLED)
	$(PY) -m app.dev.localkafka fetch
	@# The `bench` extra: confluent-kafka (variant a_ck) and py-spy (the profile phase), bench-only tools; the run
	@# goes on without them if they cannot be installed (a_ck and the profile then report an error).
	-@$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[bench]'
	$(PY) -m bench.run $(BENCH_ARGS)

broker-start: $(INSTALLED)
	$(PY) -m app.dev.localkafka start

broker-stop: $(INSTALLED)
	$(PY) -m app.dev.localkafka stop

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
