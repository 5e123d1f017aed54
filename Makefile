# Set-up and entry points; each target installs what it needs on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST_PACKAGES := qemu-system-x86 qemu-utils busybox-static mmdebstrap e2fsprogs util-linux python3-venv bubblewrap \
	debian-archive-keyring  # upgraded too: newer suites (trixie, for the pi image) need their keys
# The multi-host tests run real sshd servers on loopback.
TEST_PACKAGES := openssh-server openssh-client
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps host-deps test-deps demo test bench clean

host-deps:
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(HOST_PACKAGES)

test-deps:
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(TEST_PACKAGES)

$(PY):
	$(PYTHON) -m venv $(VENV)

deps: host-deps $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m machinen_async install

demo: deps
	$(PY) examples/fork_pi/run.py

test: deps test-deps
	$(PY) -m pytest

bench: deps
	$(PY) benchmarks/boot_exec.py

clean:
	rm -rf $(VENV) build dist *.egg-info
