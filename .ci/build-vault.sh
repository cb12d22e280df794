#!/usr/bin/env bash
# Builds a real Vault server (for the Transit KEK provider's tests) as
# ../shared/VAULT.md describes, once, and caches it outside the repo keyed
# by version. Usage: .ci/build-vault.sh DEST (make vault: DEST=bin/vault).
set -euo pipefail
VERSION=1.21.4
SDK=v0.21.0
DEST=${1:?usage: build-vault.sh DEST}
CACHE_DIR=${GOLDILOCKS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/goldilocks}/vault-$VERSION
CACHED=$CACHE_DIR/vault
log() { printf '[vault] %s\n' "$*" >&2; }

if [[ ! -x $CACHED ]]; then
	log "building Vault v$VERSION once (10-20 minutes on 2 cores); cached in $CACHE_DIR"
	src=$(go mod download -json "github.com/hashicorp/vault@v$VERSION" |
		/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
	work=$(mktemp -d /tmp/vault-build.XXXXXX)
	trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
	cp -r "$src/." "$work/"
	chmod -R u+w "$work"
	cd "$work"
	# The module zip lacks the nested ./api and ./sdk modules: use the
	# published ones instead of the local replaces.
	for r in $(sed -n 's/^replace \(github.com\/hashicorp\/vault\/[^ ]*\) => \.\/.*/\1/p' go.mod); do
		go mod edit -dropreplace="$r"
	done
	go mod edit -require="github.com/hashicorp/vault/sdk@$SDK"
	# The three one-line mends of VAULT.md (release sdk vs published sdk).
	sed -i 's/^func (i \*IdentityStore) activateDeduplication(ctx context.Context, req \*logical.Request) error {/func (i *IdentityStore) activateDeduplication(ctx context.Context, req *logical.Request, _ string) error {/' vault/identity_store_util.go
	sed -i 's/b.idStoreBackend.ActivationFunc(ctx, nil)/b.idStoreBackend.ActivationFunc(ctx, nil, "")/' vault/logical_system_activation_flags.go
	sed -i 's/restoredKeyName, err := b.lm.RestorePolicy(/restoredKeyName, err := keyName, b.lm.RestorePolicy(/' builtin/logical/transit/path_restore.go
	mkdir -p "$CACHE_DIR"
	GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$CACHED.tmp" .
	mv "$CACHED.tmp" "$CACHED"
	cd - >/dev/null
fi
mkdir -p "$(dirname "$DEST")"
ln -f "$CACHED" "$DEST" 2>/dev/null || cp "$CACHED" "$DEST"
"$DEST" version >&2
