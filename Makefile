# Goldilocks. The Makefile stays thin: build, run, test, bench, fuzz.
GO      ?= go
BIN     := bin/goldilocks
PKGS    := ./...
# Debian packages the tests drive: real NBD clients and peers.
TEST_DEBS := qemu-utils libnbd-bin python3-libnbd nbdkit fio
# Tools the production tests check against, without their recommends:
# systemd (systemd-analyze, systemd-socket-activate; not made PID 1, that
# is systemd-sysv), libvirt-clients and libxml2-utils (virt-xml-validate
# and its xmllint), libvirt-daemon and its QEMU driver (a libvirtd the
# upgrade test starts by hand; not libvirt-daemon-system, which pulls
# systemd-sysv and iptables), prometheus
# (promtool; its daemon is not started by the tests); a TCG guest:
# qemu-system-x86, busybox-static, e2fsprogs (the kernel comes from
# apt-get download at test time).
TOOL_DEBS := systemd libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu libxml2-utils prometheus qemu-system-x86 busybox-static e2fsprogs
# A single-node Ceph cluster for the RBD tests, and librbd to build against.
CEPH_DEBS := ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev librados-dev

.PHONY: all build run test deps check unit bench fuzz fuzz-brief torture vault clean

all: build

VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)

# The Ceph RBD backend (internal/rbd) is cgo against librbd: built in when
# librbd-dev and librados-dev are installed (make deps installs them),
# else the binary is pure Go and --backing rbd: says it lacks Ceph.
CEPH_TAGS = $(shell [ -f /usr/include/rbd/librbd.h ] && echo ceph pacific)

build:
	$(GO) build -trimpath -tags "$(CEPH_TAGS)" -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/goldilocks
	@[ -n "$(CEPH_TAGS)" ] || echo "note: built without Ceph RBD support (apt-get install librbd-dev librados-dev, then make build)"

run: build
	./$(BIN) serve --demo

# deps installs the test peers with apt-get when one is missing.
deps:
	@missing=""; for t in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit fio; do \
		command -v $$t >/dev/null || missing=1; done; \
	/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing=1; \
	if [ -n "$$missing" ]; then \
		echo "installing test peers: $(TEST_DEBS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_DEBS) >/dev/null; \
	fi
	@if [ ! -f /usr/include/rbd/librbd.h ] || ! command -v ceph-mon >/dev/null; then \
		echo "installing Ceph (for the RBD tests and backend): $(CEPH_DEBS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CEPH_DEBS) >/dev/null; \
	fi
	@missing=""; for t in systemd-analyze systemd-socket-activate virt-xml-validate xmllint promtool qemu-system-x86_64 busybox mkfs.ext4 libvirtd; do \
		command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		echo "installing test tools: $(TOOL_DEBS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TOOL_DEBS) >/dev/null; \
	fi

# check: formatting, vet and staticcheck (built once from the module
# proxy at a fixed version), as part of test.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
check:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)
	@if [ -n "$(CEPH_TAGS)" ]; then echo "vet and staticcheck with -tags '$(CEPH_TAGS)'"; \
		$(GO) vet -tags "$(CEPH_TAGS)" ./internal/rbd/ && $(GO) run $(STATICCHECK) -tags "$(CEPH_TAGS)" ./internal/rbd/; fi

# The interop tests drive bin/goldilocks (built without -race) with real
# clients and a real Vault (bin/vault); the in-process tests run under the
# race detector. On a fresh machine `vault` builds Vault once (10-20 min).
test: deps check build vault
	GOLDILOCKS_BIN=$(CURDIR)/$(BIN) GOLDILOCKS_VAULT_BIN=$(CURDIR)/bin/vault $(GO) test -race -count=1 -timeout 20m $(PKGS)
	@if [ -n "$(CEPH_TAGS)" ]; then echo "internal/rbd with -tags '$(CEPH_TAGS)': librbd's asynchronous path on a cluster of its own"; \
		$(GO) test -race -count=1 -timeout 5m -tags "$(CEPH_TAGS)" ./internal/rbd/; fi
	$(MAKE) --no-print-directory fuzz-brief

# bench: Go hot-path benchmarks, then the peer comparison (bench/README.md).
bench: deps build vault
	$(GO) test -run '^$$' -bench . -benchmem -count 5 ./gateway/ ./crypto/ ./internal/... ./audit/ | tee bench/go-bench.txt
	bash bench/run.sh
	bash bench/keys.sh | tee bench/keys.md
	bash bench/tls.sh | tee bench/tls.md
	bash bench/scale.sh | tee bench/scale.md
	bash bench/storage.sh | tee bench/storage.md
	bash bench/upgrade.sh | tee bench/upgrade.md
	FSYNC=16 bash bench/upgrade.sh | tee bench/upgrade-fsync16.md
	bash bench/snapshots.sh | tee bench/snapshots.md
	GOLDILOCKS_BIN=$(CURDIR)/$(BIN) GOLDILOCKS_LOAD_SECONDS=60 $(GO) test -count=1 -v -run 'TestLoad$$' ./e2e/ | tee bench/load.txt

# Every parser of bytes from a client, a disk, an upstream server or a file.
FUZZ_TARGETS = gateway:FuzzHandshake gateway:FuzzTransmission \
	crypto:FuzzParseHeader crypto:FuzzParseKeystore crypto:FuzzParseAnchor crypto:FuzzOpenBackup crypto/v1:FuzzParseHeader \
	crypto/cowmap:FuzzOpenLogBlock crypto/cowmap:FuzzNode internal/volume:FuzzParseRegistry \
	internal/upstream:FuzzHandshakeReplies internal/upstream:FuzzTransmissionReplies \
	policy:FuzzParse audit:FuzzParse
FUZZTIME ?= 2m

# fuzz: each target for FUZZTIME (make fuzz FUZZTIME=30m for a long run);
# make test runs each for 3 s (fuzz-brief) besides its seed corpus.
# Go 1.26's fuzz coordinator can fail a run at the end of -fuzztime with a
# bare "context deadline exceeded" and no input (golang/go#75804, fixed in
# Go 1.27): such a run is run once more; a failing input always fails.
fuzz:
	@set -e; out=$$(mktemp); for t in $(FUZZ_TARGETS); do \
		for try in 1 2; do \
			echo "fuzz $${t#*:} in ./$${t%%:*}/ for $(FUZZTIME)"; \
			{ rc=0; $(GO) test -run '^$$' -fuzz "^$${t#*:}$$" -fuzztime $(FUZZTIME) ./$${t%%:*}/ || rc=$$?; echo $$rc >$$out.rc; } 2>&1 | tee $$out; \
			[ "$$(cat $$out.rc)" = 0 ] && break; \
			if [ $$try = 1 ] && grep -q 'context deadline exceeded' $$out && ! grep -q 'Failing input written' $$out; then \
				echo "fuzz $${t#*:}: the coordinator's deadline race (golang/go#75804), no failing input: once more"; continue; fi; \
			rm -f $$out $$out.rc; exit 1; \
		done; \
	done; rm -f $$out $$out.rc

fuzz-brief:
	@$(MAKE) --no-print-directory fuzz FUZZTIME=3s

# torture: the crash model over many more seeds than make test runs
# (GOLDILOCKS_CRASH_FIRST shifts the range; about 7 minutes here without
# the race detector, which make test already runs over 300 seeds).
# Then the real binary: 1,000 SIGKILLs and 1,000 power cuts per volume kind
# under a random workload (e2e/torture_test.go; make test runs 6 of each).
torture: build vault
	GOLDILOCKS_CRASH_SEEDS=20000 $(GO) test -count=1 -timeout 90m -run 'TestCrashModel|TestCrashEveryPoint|TestSnapshotCrash' ./crypto/
	GOLDILOCKS_BIN=$(CURDIR)/$(BIN) GOLDILOCKS_VAULT_BIN=$(CURDIR)/bin/vault GOLDILOCKS_TORTURE_ROUNDS=$${GOLDILOCKS_TORTURE_ROUNDS:-1000} \
		$(GO) test -count=1 -timeout 180m -v -run 'TestTorture' ./e2e/

# vault: a real Vault server at bin/vault for the Transit provider's tests,
# built once from the Go module proxy and cached outside the repo.
vault:
	bash .ci/build-vault.sh bin/vault

clean:
	rm -rf bin
