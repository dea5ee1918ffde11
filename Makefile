# nstrace: the commands a newcomer types are `make demo` and `make test`.
# Both install what is missing (Debian or Ubuntu packages, as root), make the
# virtualenv and build the BPF object first. `make help` lists every target.

SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
VENV_PY ?= $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# The BPF object is compiled once with clang and relocated against the running
# kernel's BTF at load time (CO-RE), so it needs libbpf-dev's headers and the
# UAPI headers only: no kernel headers, no bpftool, no vmlinux.h.
BPF_SRC ?= probes/nstrace.bpf.c
BPF_OBJ ?= probes/build/nstrace.bpf.o
BPF_HEADERS := $(wildcard probes/*.h)
CLANG ?= clang

# bpf_tracing.h picks the register layout from __TARGET_ARCH_<arch>.
MACHINE := $(shell uname -m)
BPF_ARCH_x86_64 := x86
BPF_ARCH_aarch64 := arm64
BPF_ARCH = $(or $(BPF_ARCH_$(MACHINE)),$(error no BPF target arch known for $(MACHINE)))

# With -target bpf clang does not search the multiarch include directory, where
# Debian keeps asm/types.h (needed by linux/bpf.h): name it. gcc and
# dpkg-architecture both know the triplet; on Debian and Ubuntu it is
# <machine>-linux-gnu when neither is installed.
MULTIARCH := $(or $(shell gcc -print-multiarch 2>/dev/null),$(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null),$(MACHINE)-linux-gnu)

BPF_CFLAGS ?= -g -O2 -Wall
BPF_CPPFLAGS = -target bpf -D__TARGET_ARCH_$(BPF_ARCH) -I/usr/include/$(MULTIARCH) -Iprobes

.DEFAULT_GOAL := help
.PHONY: help deps venv probes demo test bench lint clean

help:
	@echo "make demo    build the lab and trace the tutorial's pings step by step (root)"
	@echo "make test    run the test suite (lab tests need root)"
	@echo "make bench   print nstrace's timing and overhead figures (root)"
	@echo "make lint    ruff check and ruff format --check"
	@echo "make deps    install missing Debian/Ubuntu packages (root, only if missing)"
	@echo "make venv    create $(VENV) with nstrace installed editable, with test tools"
	@echo "make probes  compile $(BPF_SRC) into $(BPF_OBJ)"
	@echo "make clean   take the lab down, remove $(VENV), probes/build and caches"

deps:
	PYTHON=$(PYTHON) MULTIARCH=$(MULTIARCH) DEPS_FOR=$(DEPS_FOR) bash scripts/install-deps.sh

# The stamp makes `make venv` a no-op until pyproject.toml changes.
venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	PIP_DISABLE_PIP_VERSION_CHECK=1 $(VENV)/bin/pip install -e '.[test]'
	touch $@

probes: $(BPF_OBJ)

$(BPF_OBJ): $(BPF_SRC) $(BPF_HEADERS) | deps
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) $(BPF_CPPFLAGS) -c $< -o $@
	@# Drop DWARF but keep .BTF and .BTF.ext, which CO-RE needs.
	if command -v llvm-strip >/dev/null; then llvm-strip -g $@; fi

demo: deps venv probes
	$(VENV_PY) -m compileall -q tracer
	$(VENV)/bin/nstrace demo

# pytest exits 5 when it collected no tests; a test run that ran nothing
# has not passed.
# The tests also need Chromium and bpftool; a target-specific variable is seen
# by the prerequisites built for it, so `make test`'s deps asks for them.
test: DEPS_FOR = test
test: deps venv probes
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then \
		echo "make test: pytest collected no tests; counting that as a failure" >&2; \
		exit 1; \
	fi; \
	exit $$status

# Compiled once here, as an installed package would be: otherwise, with
# PYTHONDONTWRITEBYTECODE set (this machine sets it), every run of nstrace
# compiles tracer/*.py again, 60 ms of each `nstrace ping`.
bench: deps venv probes
	$(VENV_PY) -m compileall -q tracer
	$(VENV_PY) bench/run.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	if [ -x $(VENV)/bin/nstrace ]; then \
		$(VENV)/bin/nstrace lab down || echo "make clean: 'nstrace lab down' failed; carrying on" >&2; \
	fi
	rm -rf probes/build $(VENV) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
