# reprobuild — developer entry points. Every target works on a fresh Debian 12 machine as root.
#   make setup   install the Debian tools and the Python venv (idempotent)
#   make test    setup, then the whole test suite (hermetic + live + boot)
#   make image   setup, then build the default image (lock/bootable) from its committed lock
#   make lint    ruff
#   make bench   the benchmark scripts in bench/, results in docs/benchmarks.md

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE ?= lock/bootable
OUT ?= out/$(notdir $(IMAGE))
PYTEST_ARGS ?=

# Debian packages the tool and its tests call. Each is justified in docs/architecture.md.
APT_PACKAGES := \
	gpgv gpg gpg-agent debian-archive-keyring \
	erofs-utils squashfs-tools e2fsprogs dosfstools mtools \
	cryptsetup-bin sbsigntool openssl openssh-client softhsm2 \
	systemd-container fdisk util-linux \
	qemu-system-x86 ovmf \
	cpio libarchive-tools binutils zstd xz-utils \
	mmdebstrap nginx-light python3-venv faketime time diffoscope-minimal uidmap \
	skopeo umoci docker-registry apache2-utils

# Only the benchmarks run these reference tools side by side with reprobuild.
BENCH_PACKAGES := mkosi debootstrap

.PHONY: setup apt venv test test-fast image lint bench clean

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    if [ "$$(id -u)" != 0 ]; then echo "error: run as root (or install: $$missing)" >&2; exit 1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -q -m "not live and not boot" $(PYTEST_ARGS)

image: setup
	$(BIN)/python tools/make_image.py $(IMAGE) $(OUT)

lint: venv
	$(BIN)/ruff check reprobuild tests bench fixtures

bench: setup
	$(MAKE) apt APT_PACKAGES="$(BENCH_PACKAGES)"
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf out build .pytest_cache
