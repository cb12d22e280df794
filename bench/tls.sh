#!/usr/bin/env bash
# TLS benchmark (run by `make bench`): what NBD over TLS costs, in 1 MiB
# sequential transfers, for Goldilocks and for qemu-nbd with --tls-creds.
# fio's nbd engine refuses tls-certificates= (../shared/PEERS.md), so the
# client is nbdcopy (libnbd, GnuTLS): reading the export to null: and writing
# a file to it, one connection, 1 MiB requests.
#
# The same SIZE file is served by: Goldilocks (--plain volume on it) without
# and with TLS, and qemu-nbd without and with TLS (x509, client certificates
# verified: verify-peer=on / --tls-ca). Certificates from openssl.
# Prints a Markdown report on stdout, progress on stderr.
#
# Knobs: SIZE (1G), REPS (3; the median is shown), GOLDILOCKS, PORT_BASE (10970).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
SIZE=${SIZE:-1G}
REPS=${REPS:-3}
PORT_BASE=${PORT_BASE:-10970}
PY=/usr/bin/python3

log() { printf '[tls %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in openssl qemu-nbd nbdcopy; do command -v $c >/dev/null || die "$c not found (make deps; openssl)"; done
[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found (make build)"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer"

W=$(mktemp -d /tmp/goldilocks-tls.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT

# ---- certificates (PEERS.md: CA, server with IP SAN, client) -------------------
mkdir -p "$W/srv" "$W/cli"
ossl() { openssl "$@" >/dev/null 2>&1 || die "openssl $1 failed"; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/ca-key.pem" -out "$W/srv/ca-cert.pem" \
	-days 2 -subj "/CN=bench CA" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
cp "$W/srv/ca-cert.pem" "$W/cli/ca-cert.pem"
leaf() { # dir prefix cn eku [san]
	local ext="$W/$2.ext"
	printf 'extendedKeyUsage=%s\n' "$4" >"$ext"
	[[ -n ${5:-} ]] && printf 'subjectAltName=%s\n' "$5" >>"$ext"
	ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1/$2-key.pem" -out "$W/$2.csr" -subj "/CN=$3"
	ossl x509 -req -in "$W/$2.csr" -CA "$W/srv/ca-cert.pem" -CAkey "$W/ca-key.pem" -CAcreateserial -days 2 \
		-out "$1/$2-cert.pem" -extfile "$ext"
}
leaf "$W/srv" server localhost serverAuth "IP:127.0.0.1,DNS:localhost"
leaf "$W/cli" client bench-client clientAuth "URI:spiffe://bench/client"

# ---- servers -------------------------------------------------------------------
log "creating a $SIZE file"
head -c "$SIZE" /dev/urandom >"$W/disk.raw"
D=$W/data
"$GOLDILOCKS" --data-dir "$D" volume create disk --plain --backing "$W/disk.raw" >/dev/null
cat >"$W/policy.yaml" <<'EOF'
identities:
  - {name: bench, tls: {uri_san: "spiffe://bench/client"}}
rules:
  - {identity: bench, volumes: [disk], access: read-write}
  - {identity: "*", volumes: [disk], access: read-write}
EOF
P_GL=$PORT_BASE P_GLTLS=$((PORT_BASE + 1)) P_Q=$((PORT_BASE + 2)) P_QTLS=$((PORT_BASE + 3))
wait_port() { for _ in $(seq 100); do $PY -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return; sleep 0.1; done; die "nothing listens on $1"; }
start() { "$@" >>"$W/servers.log" 2>&1 & PIDS+=($!); }
declare -A SPID
start "$GOLDILOCKS" --data-dir "$D" serve --listen 127.0.0.1:$P_GL --unix none --metrics ''
SPID[goldilocks]=$!
wait_port $P_GL
# A second gateway on the same data dir would fight for its control socket:
# the TLS one gets its own data dir holding the same backing file.
D2=$W/data2
"$GOLDILOCKS" --data-dir "$D2" volume create disk --plain --backing "$W/disk.raw" >/dev/null
start "$GOLDILOCKS" --data-dir "$D2" serve --listen 127.0.0.1:$P_GLTLS --unix none --metrics '' --policy "$W/policy.yaml" \
	--tls-cert "$W/srv/server-cert.pem" --tls-key "$W/srv/server-key.pem" --tls-ca "$W/srv/ca-cert.pem" --tls-required
SPID[goldilocks-tls]=$!
wait_port $P_GLTLS
start qemu-nbd -t -e 4 -f raw -x disk -b 127.0.0.1 -p $P_Q "$W/disk.raw"
SPID[qemu-nbd]=$!
wait_port $P_Q
start qemu-nbd --object "tls-creds-x509,id=tls0,endpoint=server,dir=$W/srv,verify-peer=on" --tls-creds tls0 \
	-t -e 4 -f raw -x disk -b 127.0.0.1 -p $P_QTLS "$W/disk.raw"
SPID[qemu-nbd-tls]=$!
wait_port $P_QTLS

declare -A URI=(
	[goldilocks]="nbd://127.0.0.1:$P_GL/disk"
	[goldilocks-tls]="nbds://127.0.0.1:$P_GLTLS/disk?tls-certificates=$W/cli"
	[qemu-nbd]="nbd://127.0.0.1:$P_Q/disk"
	[qemu-nbd-tls]="nbds://127.0.0.1:$P_QTLS/disk?tls-certificates=$W/cli"
)
SERVERS=(goldilocks goldilocks-tls qemu-nbd qemu-nbd-tls)
bytes=$(stat -c %s "$W/disk.raw")
head -c "$bytes" /dev/urandom >"$W/src.raw"

ticks() { awk '{print $14 + $15}' "/proc/${SPID[$1]}/stat"; }
declare -A CPU # dir,server -> server CPU ticks over all reps
copy() { # dir server -> MB/s
	local t0 t1 c0
	c0=$(ticks "$2")
	t0=$(date +%s.%N)
	if [[ $1 == read ]]; then
		nbdcopy --request-size=1048576 --connections=1 "${URI[$2]}" null: || die "nbdcopy from $2"
	else
		nbdcopy --request-size=1048576 --connections=1 "$W/src.raw" "${URI[$2]}" || die "nbdcopy to $2"
	fi
	t1=$(date +%s.%N)
	CPU[$1,$2]=$(( ${CPU[$1,$2]:-0} + $(ticks "$2") - c0 ))
	$PY -c "print(f'{$bytes / ($t1 - $t0) / 1e6:.0f}')"
}
median() { printf '%s\n' "$@" | sort -n | $PY -c 'import sys; v=[float(x) for x in sys.stdin]; print(f"{sorted(v)[len(v)//2]:.0f}")'; }

declare -A RES
for dir in read write; do
	for s in "${SERVERS[@]}"; do RES[$dir,$s]=""; done
	for r in $(seq "$REPS"); do
		for s in "${SERVERS[@]}"; do # alternate servers within a repetition
			log "$dir $s (rep $r)"
			copy $dir $s >"$W/mbps"
			RES[$dir,$s]+="$(cat "$W/mbps") "
		done
	done
done

ratio() { $PY -c "print(f'{$1 / $2:.2f}')"; }
cat <<EOF
## NBD over TLS ($(date -u +%Y-%m-%d), $(nproc) CPUs, SIZE=$SIZE REPS=$REPS; \`bash bench/tls.sh\`)

nbdcopy --request-size=1048576 --connections=1, loopback TCP, the file in the page cache; MB/s, median of $REPS.
TLS: x509 with client certificates verified, TLS 1.3 (Goldilocks: Go crypto/tls; qemu-nbd and nbdcopy: GnuTLS).

| transfer | Goldilocks plain | Goldilocks TLS | TLS/plain | qemu-nbd plain | qemu-nbd TLS | TLS/plain | Goldilocks TLS / qemu-nbd TLS |
|---|---|---|---|---|---|---|---|
EOF
for dir in read write; do
	g=$(median ${RES[$dir,goldilocks]}); gt=$(median ${RES[$dir,goldilocks-tls]})
	q=$(median ${RES[$dir,qemu-nbd]}); qt=$(median ${RES[$dir,qemu-nbd-tls]})
	echo "| 1 MiB sequential $dir | $g | $gt | $(ratio "$gt" "$g") | $q | $qt | $(ratio "$qt" "$q") | $(ratio "$gt" "$qt") |"
done
echo
hz=$(getconf CLK_TCK)
gib=$($PY -c "print($bytes * $REPS / 2**30)")
cpu() { $PY -c "print(f'{${CPU[$1,$2]:-0} / $hz / $gib:.2f}')"; }
echo "Server CPU seconds per GiB moved (from /proc/PID/stat, all $REPS runs):"
echo
echo "| transfer | Goldilocks plain | Goldilocks TLS | qemu-nbd plain | qemu-nbd TLS |"
echo "|---|---|---|---|---|"
for dir in read write; do
	echo "| $dir | $(cpu $dir goldilocks) | $(cpu $dir goldilocks-tls) | $(cpu $dir qemu-nbd) | $(cpu $dir qemu-nbd-tls) |"
done
echo
echo "Runs (MB/s): $(for k in "${!RES[@]}"; do printf '%s: %s; ' "$k" "${RES[$k]}"; done)"
