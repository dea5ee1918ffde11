#!/usr/bin/env bash
# Install the Debian or Ubuntu packages that nstrace needs, and only those that
# are missing. When every tool is already there it does nothing, so `make deps`
# on a prepared machine (a developer's, CI's) needs no network and no root.
#
# Usage: scripts/install-deps.sh        (PYTHON=python3 by default)
set -euo pipefail

# nft, iptables and ip live in sbin, which is not on a normal user's PATH.
PATH="$PATH:/usr/sbin:/sbin"
PYTHON="${PYTHON:-python3}"
MULTIARCH="${MULTIARCH:-$(uname -m)-linux-gnu}"

missing=()   # packages without which nstrace cannot build, run or be tested
optional=()  # packages that help; installed only when apt runs anyway

need_command() { # COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}

need_file() { # GLOB PACKAGE
	compgen -G "$1" >/dev/null || missing+=("$2")
}

want_command() { # COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || optional+=("$2")
}

# Building the BPF object: clang, libbpf's headers (bpf_helpers.h and
# friends) and the UAPI headers that linux/bpf.h pulls in (asm/types.h).
need_command clang clang
need_file /usr/include/bpf/bpf_helpers.h libbpf-dev
need_file "/usr/include/$MULTIARCH/asm/types.h" linux-libc-dev
want_command llvm-strip llvm

# Running: the netfilter ruleset (nft, libnftables for the owner-flagged
# trace table), iptables for the lab's rules, ip for namespaces.
need_command nft nftables
need_file '/usr/lib/*/libnftables.so.1*' libnftables1
need_command iptables iptables
need_command ip iproute2
need_command iperf3 iperf3
# `make bench` compares nstrace ping with iputils ping over the same path.
need_command ping iputils-ping
want_command tcpdump tcpdump
need_command make make

# Pictures (`ping --svg/--png`, `lab run --report`): Graphviz's dot lays out
# the topology.
need_command dot graphviz

# Only the tests need these (DEPS_FOR=test, set by `make test`): the report's
# tests open it in headless Chromium, and after kill -9 of nstrace bpftool
# lists what BPF objects remain (bpftool never builds or loads anything).
# Ubuntu ships neither under these names (a snap, linux-tools), so elsewhere
# they are only tried, never required.
if [ "${DEPS_FOR:-}" = test ]; then
	need_command chromium chromium
	need_command bpftool bpftool
else
	want_command chromium chromium
	want_command bpftool bpftool
fi

# Python: Debian and Ubuntu split venv's ensurepip into python3-venv, without
# which `python3 -m venv` fails half way ("ensurepip is not available").
if ! command -v "$PYTHON" >/dev/null 2>&1; then
	missing+=(python3 python3-venv)
elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
	missing+=(python3-venv)
fi

if [ ${#missing[@]} -eq 0 ]; then
	echo "deps: every tool nstrace needs is installed"
	if [ ${#optional[@]} -gt 0 ]; then
		echo "deps: optional, not installed: ${optional[*]}"
	fi
	exit 0
fi

packages=("${missing[@]}" "${optional[@]}")
echo "deps: missing: ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
	echo "deps: no apt-get here; install the equivalents of: ${packages[*]}" >&2
	exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "deps: run as root: apt-get install ${packages[*]}" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
set -x
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
# One at a time, so that one not known here (another distribution's name)
# costs only itself.
for package in "${optional[@]}"; do
	apt-get install -y --no-install-recommends "$package" ||
		echo "deps: optional $package could not be installed; carrying on" >&2
done
