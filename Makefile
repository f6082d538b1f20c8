# Everything a fresh machine needs: a virtual env with the project, Kafka's jars (via Maven).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install jars browser prometheus docker-tools images lint test-containers demo test test-unit fuzz bench-engine bench-live chaos bench-replay bench-replay-instructions bench-http serve broker-start broker-stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# ruff (pyflakes, import order, bugbear, bandit, ...) and mypy (strict on the worker's core and the
# SDK), as configured in pyproject.toml: the first step of `make test` and `make test-unit`
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

jars: $(STAMP)
	$(BIN)/agent-monitor broker fetch

# Debian's chromium: the HTML report test renders the report in a real headless browser
browser:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

# Debian's prometheus (prometheus and promtool): the alert rules' unit tests, and a real Prometheus
# scraping a worker in the integration tests
prometheus:
	command -v prometheus >/dev/null && command -v promtool >/dev/null || (apt-get update && apt-get install -y --no-install-recommends prometheus)

# Debian's docker.io (dockerd, its BuildKit) and debootstrap: `make images` builds every base image
# here, since no image registry is reachable
docker-tools:
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || (apt-get update && apt-get install -y docker.io debootstrap)

# the images docker-compose.yml runs, built locally (deploy/local/images.py); starts dockerd if none answers
images: $(STAMP) docker-tools
	deploy/local/with-dockerd $(BIN)/python -m deploy.local.images

# docker-compose.yml's stack in containers (tests/containers): images rebuilt from the working tree,
# then Kafka, topics, two workers, Prometheus, the sample sessions from the host; not part of `make test`
test-containers: $(STAMP) docker-tools
	start=$$(date +%s); deploy/local/with-dockerd sh -c '$(BIN)/python -m deploy.local.images && $(BIN)/python -m pytest -q tests/containers tests/deploy/test_local_stack.py'; rc=$$?; \
	echo "make test-containers: exit $$rc after $$(( $$(date +%s) - start ))s"; exit $$rc

demo: jars
	$(BIN)/agent-monitor demo

test: lint jars browser prometheus
	$(BIN)/python -m pytest -q

test-unit: lint prometheus
	$(BIN)/python -m pytest -q -m 'not integration'

# 100,000 seeded hostile records through decoding and evaluation: bench/results/fuzz.json
fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py

bench-engine: $(STAMP)
	$(BIN)/python bench/engine.py

# the live path: latency at offered loads, a backlog's throughput, the runtime's bare ceiling
bench-live: jars
	$(BIN)/python bench/live.py

# workers killed, the broker restarted, rebalances: nothing lost, nothing contradicted (both guarantees)
chaos: jars
	$(BIN)/python bench/chaos.py

bench-replay: $(STAMP)
	$(BIN)/python bench/replay.py

# instructions per replayed batch under valgrind: steady where wall-clock time is not
bench-replay-instructions: $(STAMP)
	command -v valgrind >/dev/null || (apt-get update && apt-get install -y valgrind)
	$(BIN)/python bench/replay_instructions.py

# /api/monitor/check over HTTP (1, 8, 32 clients) beside invariant-ai's LocalPolicy in process
bench-http: $(STAMP)
	$(BIN)/python bench/http_api.py

# the HTTP API on 127.0.0.1:8000 without keys (loopback only), serving examples/policies
serve: $(STAMP)
	$(BIN)/agent-monitor serve --no-auth --policy examples/policies

broker-start: jars
	$(BIN)/agent-monitor broker start

broker-stop: $(STAMP)
	$(BIN)/agent-monitor broker stop

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache build *.egg-info
