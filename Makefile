# Set-up and entry points; each target installs what it needs on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST_PACKAGES := busybox-static mmdebstrap uidmap e2fsprogs libarchive13 util-linux python3-venv bubblewrap patchelf \
	debian-archive-keyring  # upgraded too: newer suites (trixie, for the pi image) need their keys
# uidmap: mmdebstrap's unshare mode, how a non-root user builds a Debian rootfs; patchelf: the
# agent's own interpreter in OCI images (store/guest_runtime.py); libarchive13: what mke2fs reads a
# tarball with
# QEMU >= 9.0 migrates a running TCG guest without losing its writes, which a fork's live capture
# needs (docs/internals.md "Capture"); bookworm's own QEMU is 7.2, so there it comes from
# bookworm-backports (10.0). Other releases use their own.
QEMU_PACKAGES := qemu-system-x86 qemu-utils
# e2fsprogs >= 1.47.1 builds an ext4 straight from a tarball (mke2fs -d FILE.tar): nothing is
# unpacked, so device nodes and ownership need no root; bookworm has 1.47.0, its backports 1.47.2.
BACKPORTED_PACKAGES := $(QEMU_PACKAGES) e2fsprogs
RELEASE := $(shell . /etc/os-release 2>/dev/null && echo $$VERSION_CODENAME)
BACKPORTS := $(if $(filter bookworm,$(RELEASE)),bookworm-backports)
BACKPORTS_SOURCE := /etc/apt/sources.list.d/machinen-bookworm-backports.sources
# openssh: the multi-host tests' sshd servers on loopback; docker-registry, apache2-utils (htpasswd):
# tests/oci_registry.py; dnsmasq-base, iproute2: tests/egress_hosts.py (test DNS, network namespaces).
TEST_PACKAGES := openssh-server openssh-client docker-registry apache2-utils dnsmasq-base iproute2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps py-deps host-deps test-deps demo test test-unit bench docs clean

host-deps:
ifneq ($(BACKPORTS),)
	grep -rqs '$(BACKPORTS)' /etc/apt/sources.list /etc/apt/sources.list.d/ || printf '%s\n' \
		'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: $(BACKPORTS)' 'Components: main' \
		'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' | $(SUDO) tee $(BACKPORTS_SOURCE) >/dev/null
endif
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(HOST_PACKAGES)
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
		$(if $(BACKPORTS),-t $(BACKPORTS)) $(BACKPORTED_PACKAGES)

test-deps:
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(TEST_PACKAGES)
	# The tests start registries of their own; the package's service (where systemd runs) is not needed.
	-$(SUDO) systemctl disable --now docker-registry 2>/dev/null

$(PY):
	$(PYTHON) -m venv $(VENV)

py-deps: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

deps: host-deps py-deps
	$(PY) -m machinen_async install

demo: deps
	$(PY) examples/fork_pi/run.py

test: deps test-deps
	$(PY) -m pytest

test-unit: py-deps  # the quick loop: no VM (host packages as `make test` installs them)
	MACHINEN_VMM=no-vm-in-the-unit-tier $(PY) -m pytest tests/unit

bench: deps
	$(PY) benchmarks/boot_exec.py

docs:  # what is generated from the code (tests/unit/test_errors.py checks it is current)
	$(PY) -c 'from machinen_async.errors import errors_markdown; print(errors_markdown(), end="")' > docs/errors.md
	$(PY) -c 'from machinen_async.cli import cli_markdown; print(cli_markdown(), end="")' > docs/cli.md

clean:
	rm -rf $(VENV) build dist *.egg-info
