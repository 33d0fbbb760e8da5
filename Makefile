# Two commands on a fresh machine: `make run` and `make test`. Each bootstraps .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/engine.dev.toml
PYTEST_ARGS ?=
# Debian packages the test suite needs (independent DKIM verifier; Chromium for the dashboard's browser tests).
DEB_TEST_PKGS := libmail-dkim-perl opendkim opendkim-tools chromium

.PHONY: install run test bench deb-test lint clean

$(PY):
	@echo "creating $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Two stamps: `make run` installs what running needs; `make test` adds the test extras (and stamps
# both: .[test] includes the runtime). pip speaks for itself (no -q): a first install takes a while.
$(RUN_STAMP): pyproject.toml | $(PY)
	@echo "installing the engine into $(VENV) (what running needs)"
	$(PIP) install -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(PY)
	@echo "installing the engine and the test tools into $(VENV)"
	$(PIP) install -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

LINT_STAMP := $(VENV)/.lint-installed
$(LINT_STAMP): pyproject.toml | $(STAMP)
	$(PIP) install -q -e '.[test,lint]'
	touch $(LINT_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/engine --config $(CONFIG) run

deb-test:
	@missing=""; for p in $(DEB_TEST_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || echo "warning: could not install$$missing; tests needing them will skip"; \
	fi

test: $(STAMP) deb-test
	$(VENV)/bin/pytest -n 2 -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Kubernetes version the manifests in deploy/k8s are validated against (schemas bundled, offline).
K8S_VERSION ?= 1.31.0
K8S_MANIFESTS := $(filter-out deploy/k8s/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))

# ruff (style and likely bugs) over everything; mypy --strict over engine/ (config in pyproject.toml);
# the Dockerfile (hadolint) and the Kubernetes manifests (kubernetes-validate, strict: unknown fields fail).
# deploy/compose.yaml and deploy/systemd are checked by tests/test_deploy.py.
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check engine tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint deploy/Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet -k $(K8S_VERSION) $(K8S_MANIFESTS)

clean:
	rm -rf $(VENV) var .pytest-pg .pytest_cache test-artifacts
