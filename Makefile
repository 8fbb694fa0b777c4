# sandboxd developer entry points.  `make run` and `make test` are the two commands
# a new machine needs; everything they need is installed from here.
SHELL := /bin/bash
PY := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
# sandboxd-mcp's venv: the MCP SDK (PyPI only) needs newer starlette, uvicorn and anyio than
# Debian 12's, which sandboxd-http and the .deb use and .venv tests; so it has a venv of its own
# over the same Debian packages, with sandboxd in it too, as `pipx install "sandboxd[mcp]"` gives.
MCP_VENV := .venv-mcp
SYSPATH := PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Runtime dependencies come from Debian (the .deb depends on the same packages): what `make
# run` installs.  starlette, uvicorn (with uvloop and httptools) and prometheus-client are
# sandboxd-http's; jinja2 (Dify's template node), requests and httpx (what dify-sandbox's image
# ships for code nodes) go into the default root; python3-venv (with its pip wheel) builds
# environments; python3-systemd sends the journal its fields.
APT_PACKAGES := python3-msgpack python3-yaml python3-seccomp python3-daemon python3-sdnotify \
	python3-nftables python3-pyroute2 \
	python3-starlette python3-uvicorn python3-uvloop python3-httptools python3-prometheus-client \
	python3-jinja2 python3-requests python3-httpx python3-venv python3-systemd nftables iproute2
# What `make test` adds: numpy for the preload tests and benchmark, matplotlib for the figure
# tests (and the benchmark's plot), mandoc for the man pages, dnsmasq-base for the network
# tests' own test hosts; gcc, python3-dev, setuptools, wheel and libyaml make the environment
# tests' wheelhouse.  (httpx, Dify's HTTP client in the sandboxd-http tests, is a runtime one.)
TEST_PACKAGES := python3-numpy python3-matplotlib mandoc dnsmasq-base \
	gcc python3-dev python3-pip python3-setuptools python3-wheel libyaml-0-2
BENCH_PACKAGES := bubblewrap
PROFILE_PACKAGES := linux-perf
E2E_PACKAGES := debootstrap systemd-container qemu-system-x86 e2fsprogs
# make fleet: nodes under systemd-nspawn, and Debian's HAProxy in front of them.
FLEET_PACKAGES := debootstrap systemd-container haproxy
DEV_TOOLS := ruff==0.8.4 mypy==1.13.0 pytest==8.3.4 hypothesis==6.122.3 types-PyYAML==6.0.12.20241230
INIT := sandboxd/jail/child/sandboxd-init
CC_INIT := gcc -O2 -static -s -Wall -Wextra -Werror
RUN_DIR := $(CURDIR)/run
DEV_SOCKET := $(RUN_DIR)/sandboxd.sock
PYTEST_ARGS ?=

.PHONY: dev dev-tools run test test-slow lint typecheck unit system bench profile fuzz soak e2e fleet deb man-lint clean apt-deps

# dev: what `make run` needs (Debian's packages, the venv with sandboxd in it); dev-tools adds
# the test and lint tools for `make test`.
dev: $(VENV)/.stamp $(MCP_VENV)/.stamp

dev-tools: $(VENV)/.tools-stamp $(MCP_VENV)/.tools-stamp

$(VENV)/.tools-stamp: $(VENV)/.stamp
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(TEST_PACKAGES)"
	$(VPY) -m pip install -q $(DEV_TOOLS)
	@touch $@

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.stamp: pyproject.toml setup.py Makefile $(INIT) sandboxd/jail/child/_spawn.c
	@$(MAKE) --no-print-directory apt-deps
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

$(MCP_VENV)/.stamp: $(VENV)/.stamp
	$(PY) -m venv --system-site-packages $(MCP_VENV)
	$(MCP_VENV)/bin/pip install -q --no-build-isolation -e ".[mcp]"
	@touch $@

$(MCP_VENV)/.tools-stamp: $(MCP_VENV)/.stamp $(VENV)/.tools-stamp
	$(MCP_VENV)/bin/pip install -q $(DEV_TOOLS)
	@touch $@

# sandboxd-init, a worker's pid 1 (a few pages of C, static: it is exec'd for every worker, so no
# loader and no shared libraries to map).  The Debian package builds the same file.
$(INIT): sandboxd/jail/child/init.c
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="gcc libc6-dev"
	$(CC_INIT) -o $@ $<

run: dev
	@mkdir -p $(RUN_DIR)
	@echo "sandboxd: starting in the foreground on $(DEV_SOCKET) (Ctrl-C stops it)."
	@echo "In another terminal, as root or a member of the socket's group, send it code:"
	@echo "    $(VENV)/bin/sandboxctl --socket $(DEV_SOCKET) run -c 'print(\"hello from the jail\")'"
	@echo "    echo 'import sys; print(sys.stdin.read()[::-1])' > /tmp/rev.py; echo hello | $(VENV)/bin/sandboxctl --socket $(DEV_SOCKET) run /tmp/rev.py"
	$(VENV)/bin/sandboxd --foreground --config etc/sandboxd/sandboxd.yaml \
		--socket $(DEV_SOCKET) --state-dir $(RUN_DIR)/state

lint: dev-tools
	$(VENV)/bin/ruff check sandboxd tests

typecheck: dev-tools
	$(VENV)/bin/mypy
	$(MCP_VENV)/bin/mypy sandboxd/mcp tests/test_mcp.py tests/mcp_servers.py tests/bench/mcp_bench.py

# unit: the tests that need neither root nor a daemon (tests/unit/), in seconds; system: the
# rest, against real daemons, as root (about nine minutes on two cores); the MCP tests need the
# SDK, so .venv-mcp's pytest runs them (.venv's does not collect them).
unit: dev-tools
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

system: dev-tools
	$(VENV)/bin/pytest tests --ignore=tests/unit $(PYTEST_ARGS)
	$(MCP_VENV)/bin/pytest tests/test_mcp.py $(PYTEST_ARGS)

test: lint typecheck man-lint unit system

# Tests too slow for `make test` (pytest -m slow): rebuilds of the root back to back and at
# once.
test-slow: dev-tools
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

man-lint: dev-tools
	@for m in man/*.[1-8]; do mandoc -Tlint -Wwarning $$m || exit 1; done
	$(VPY) -m sandboxd.tools.settings_doc --check etc/sandboxd/sandboxd.yaml man/sandboxd.yaml.5 man/sandboxd-http.8 \
		man/sandboxd-mcp.1

bench: dev-tools
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(BENCH_PACKAGES)"
	$(VPY) tests/bench/bench.py $(BENCH_ARGS)
	$(MCP_VENV)/bin/python tests/bench/mcp_bench.py $(BENCH_ARGS)

# Where the CPU of a closed loop of print(1) goes, per process kind (perf, system-wide).
profile: dev-tools
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(PROFILE_PACKAGES)"
	$(VPY) tests/bench/profile.py $(PROFILE_ARGS)

# 25,000 examples for each daemon-facing property (1,250 for oversized lengths) and the
# validator: about 126,000 inputs in all.
fuzz: dev-tools
	SANDBOXD_FUZZ_EXAMPLES=$${SANDBOXD_FUZZ_EXAMPLES:-25000} $(VENV)/bin/pytest -q tests/test_fuzz.py \
		-p no:cacheprovider --durations=0 -rP

soak: dev-tools
	$(VPY) tests/soak/soak.py $(SOAK_ARGS)

e2e:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(E2E_PACKAGES)"
	$(SYSPATH) tests/e2e/run.sh

# Three nodes booted from the .deb behind HAProxy, on a private network of their own: load,
# one node killed, one drained, one upgraded (docs/fleet.md).  About four minutes once the
# node root is cached (the first time adds make e2e's base root and the package's Depends).
fleet: dev-tools
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(FLEET_PACKAGES)"
	$(SYSPATH) tests/fleet/run.sh

deb:
	$(SYSPATH) packaging/build-deb.sh

clean:
	rm -rf $(VENV) $(MCP_VENV) $(INIT) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache $(RUN_DIR)
