#!/usr/bin/env bash
# Key-operation benchmark (run by `make bench`; the figures the key-rotation
# issue asks for). Prints a Markdown report on stdout, progress on stderr.
#
# 1. Rotation: VOLUMES encrypted volumes whose data keys are wrapped by one
#    Transit key of a real Vault dev server (bin/vault, `make vault`), then
#    `goldilocks key rotate vault:bench` timed offline (no gateway: the command
#    opens each header itself) and online (a gateway serves the data dir and
#    runs the rotation through its control socket).
# 2. Rekey throughput: a REKEY_SIZE volume filled with random data, then
#    `goldilocks key rekey` timed on the idle volume, with and without a gateway.
# 3. Foreground IOPS kept during a rekey: fio (ioengine=nbd, 4k random read and
#    write, iodepth 32, RUNTIME s) alone, then while `key rekey --rate RATE`
#    runs, and while an uncapped rekey runs.
#
# Knobs: VOLUMES (1000), REKEY_SIZE (1GiB), RUNTIME (10), RATE (64MiB),
#        GOLDILOCKS (bin/goldilocks), VAULT (bin/vault), PORT_BASE (10950).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
VAULT=${VAULT:-$REPO/bin/vault}
VOLUMES=${VOLUMES:-1000}
REKEY_SIZE=${REKEY_SIZE:-1GiB}
RUNTIME=${RUNTIME:-10}
RATE=${RATE:-64MiB}
PORT_BASE=${PORT_BASE:-10950}
PY=/usr/bin/python3

log() { printf '[keys %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found (make build)"
[[ -x $VAULT ]] || die "$VAULT not found (make vault)"
for c in fio nbdcopy; do command -v $c >/dev/null || die "$c not found (make deps)"; done
[[ $VOLUMES =~ ^[1-9][0-9]*$ ]] || die "VOLUMES must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer"

W=$(mktemp -d /tmp/goldilocks-keys.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { $PY -c "print(f'{$2 - $1:.2f}')"; }

VPORT=$PORT_BASE
NBDPORT=$((PORT_BASE + 5)) # Vault takes VPORT+1 for its cluster listener
"$VAULT" server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:$VPORT -dev-no-store-token >"$W/vault.log" 2>&1 &
PIDS+=($!)
export VAULT_ADDR=http://127.0.0.1:$VPORT VAULT_TOKEN=root
for _ in $(seq 100); do "$VAULT" status >/dev/null 2>&1 && break; sleep 0.1; done
"$VAULT" secrets enable transit >/dev/null

D=$W/data
G() { "$GOLDILOCKS" --data-dir "$D" "$@"; }
GW_PID=
start_gw() {
	"$GOLDILOCKS" --data-dir "$D" serve --listen 127.0.0.1:$NBDPORT --unix none --metrics '' 2>"$W/gw.log" &
	GW_PID=$!
	PIDS+=($GW_PID)
	for _ in $(seq 100); do grep -q 'msg=listening' "$W/gw.log" 2>/dev/null && return; sleep 0.1; done
	die "gateway did not start: $(cat "$W/gw.log")"
}
stop_gw() { kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; }

log "creating $VOLUMES volumes with a Vault KEK"
t0=$(now)
for i in $(seq -w 1 "$VOLUMES"); do G volume create "r$i" --size 1MiB --kek vault:bench >/dev/null; done
t_create=$(elapsed "$t0" "$(now)")

log "key rotate offline"
t0=$(now); G key rotate vault:bench >/dev/null; t_off=$(elapsed "$t0" "$(now)")
start_gw
log "key rotate online (through the gateway)"
t0=$(now); G key rotate vault:bench >/dev/null; t_on=$(elapsed "$t0" "$(now)")
ver=$(G key status r$(printf "%0${#VOLUMES}d" 1) --json | $PY -c 'import json,sys; print(json.load(sys.stdin)[0]["version"])')
stop_gw

log "rekey: filling a $REKEY_SIZE volume"
G volume create big --size "$REKEY_SIZE" >/dev/null
bytes=$(G volume info big --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["size"])')
head -c "$bytes" /dev/urandom >"$W/src.raw"
G volume import big --from "$W/src.raw" >/dev/null
log "rekey offline, idle"
t0=$(now); G key rekey big >/dev/null 2>&1; t_rk_off=$(elapsed "$t0" "$(now)")
start_gw
log "rekey online, idle"
t0=$(now); G key rekey big >/dev/null 2>&1; t_rk_on=$(elapsed "$t0" "$(now)")

fio_iops() { # rw -> IOPS
	fio --name=j --ioengine=nbd --uri="nbd://127.0.0.1:$NBDPORT/big" --rw="$1" --bs=4k --iodepth=32 \
		--time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json --output="$W/fio.json" >"$W/fio.log" 2>&1 ||
		die "fio: $(cat "$W/fio.log")"
	$PY -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))' "$W/fio.json"
}
declare -A IOPS
for rw in randread randwrite; do
	log "fio $rw alone"
	IOPS[$rw,idle]=$(fio_iops $rw)
	for mode in capped uncapped; do
		args=()
		[[ $mode == capped ]] && args=(--rate "$RATE")
		# Rekeys back to back for the whole fio run (each one a new DEK).
		rm -f "$W/stop" "$W/rekeys"
		(while [[ ! -e $W/stop ]]; do G key rekey big "${args[@]}" >/dev/null 2>&1 && echo done >>"$W/rekeys"; done) &
		loop=$!
		sleep 0.5
		log "fio $rw during a $mode rekey"
		IOPS[$rw,$mode]=$(fio_iops $rw)
		touch "$W/stop"
		pkill -INT -f "key rekey big" || true
		wait $loop 2>/dev/null || true
		IOPS[$rw,$mode,n]=0
		[[ -f $W/rekeys ]] && IOPS[$rw,$mode,n]=$(wc -l <"$W/rekeys")
	done
done
G key rekey big >/dev/null 2>&1 # finish an interrupted one
stop_gw

mbps() { $PY -c "print(f'{$1 / $2 / 1e6:.0f}')"; }
pct() { $PY -c "print(f'{100 * $1 / max($2, 1):.0f}')"; }
cat <<EOF
## Key operations ($(date -u +%Y-%m-%d), $(nproc) CPUs, VOLUMES=$VOLUMES REKEY_SIZE=$REKEY_SIZE RUNTIME=$RUNTIME RATE=$RATE)

Vault v$("$VAULT" version | sed -n 's/^Vault v\([^ ,]*\).*/\1/p') dev server on loopback; \`bash bench/keys.sh\`.

| operation | time | rate |
|---|---|---|
| create $VOLUMES volumes with a Vault KEK (one CLI process each) | ${t_create} s | |
| \`key rotate vault:bench\` over $VOLUMES volumes, no gateway | ${t_off} s | $($PY -c "print(f'{$VOLUMES / $t_off:.0f}')") volumes/s |
| \`key rotate vault:bench\` over $VOLUMES volumes, through a running gateway | ${t_on} s | $($PY -c "print(f'{$VOLUMES / $t_on:.0f}')") volumes/s |
| \`key rekey\` of an idle, full $REKEY_SIZE volume, no gateway | ${t_rk_off} s | $(mbps "$bytes" "$t_rk_off") MB/s |
| \`key rekey\` of an idle, full $REKEY_SIZE volume, through a gateway | ${t_rk_on} s | $(mbps "$bytes" "$t_rk_on") MB/s |

(Key version after the two rotations: v$ver.)

Foreground 4 KiB IOPS (fio, ioengine=nbd, iodepth 32, ${RUNTIME} s) on the same volume:

| job | alone | during \`key rekey --rate $RATE\` | kept | during an uncapped rekey | kept |
|---|---|---|---|---|---|
| randread | ${IOPS[randread,idle]} | ${IOPS[randread,capped]} | $(pct "${IOPS[randread,capped]}" "${IOPS[randread,idle]}")% | ${IOPS[randread,uncapped]} | $(pct "${IOPS[randread,uncapped]}" "${IOPS[randread,idle]}")% |
| randwrite | ${IOPS[randwrite,idle]} | ${IOPS[randwrite,capped]} | $(pct "${IOPS[randwrite,capped]}" "${IOPS[randwrite,idle]}")% | ${IOPS[randwrite,uncapped]} | $(pct "${IOPS[randwrite,uncapped]}" "${IOPS[randwrite,idle]}")% |

A rekey ran for the whole of each fio run (back to back, each a new data key); whole rekeys completed meanwhile: randread capped ${IOPS[randread,capped,n]}, uncapped ${IOPS[randread,uncapped,n]}; randwrite capped ${IOPS[randwrite,capped,n]}, uncapped ${IOPS[randwrite,uncapped,n]}.
EOF
