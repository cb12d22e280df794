#!/usr/bin/env bash
# Snapshot and backup figures of issue 15 (run by `make bench`, or alone).
#
# 1. Snapshot create under load: a SNAP_GIB (64) GiB encrypted volume,
#    sparse, served by the gateway; fio writes 4k random blocks at iodepth
#    16 over NBD for LOAD_S seconds (FSYNC=N: a flush every N writes, as a
#    guest's journal makes; default 0, none: the worst case) while
#    `volume snapshot create` runs SNAPS times. For each: how long the volume's writes waited (the flush
#    point: `pause_ns` of --json) and the command's wall time.
# 2. Incremental against full backup: a BACKUP_GIB (16) GiB encrypted
#    volume, FILL_GIB (8) GiB of it written with random data by fio;
#    snapshot s0, a full backup of it; CHANGE_PCT (1) % of the volume
#    rewritten in 64 KiB random blocks; snapshot s1, a backup --since s0.
#    Each: bytes read from the snapshot, stream bytes, seconds.
# 3. Throughput: `volume export` (raw plaintext) and `volume import` of the
#    same volume, against the full backup and a restore of it.
# PARTS="1 2 3" selects the parts. Prints a Markdown report on stdout;
# progress on stderr.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
SNAP_GIB=${SNAP_GIB:-64}
LOAD_S=${LOAD_S:-30}
SNAPS=${SNAPS:-5}
BACKUP_GIB=${BACKUP_GIB:-16}
FILL_GIB=${FILL_GIB:-8}
CHANGE_PCT=${CHANGE_PCT:-1}
PORT=${PORT:-10960}
FSYNC=${FSYNC:-0}
PARTS=${PARTS:-"1 2 3"}
part() { [[ " $PARTS " == *" $1 "* ]]; }

W=$(mktemp -d /tmp/goldilocks-snapbench.XXXXXX)
D=$W/data
GW=
cleanup() {
	[ -n "$GW" ] && kill "$GW" 2>/dev/null && wait "$GW" 2>/dev/null
	rm -rf "$W"
}
trap cleanup EXIT
say() { echo "[snapbench $(date +%H:%M:%S)] $*" >&2; }
gl() { "$GOLDILOCKS" "$@" --data-dir "$D"; }
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

start_gw() {
	"$GOLDILOCKS" serve --data-dir "$D" --listen "127.0.0.1:$PORT" --unix none --metrics "" --log-level warn 2>"$W/gw.log" &
	GW=$!
	for _ in $(seq 100); do
		nbdinfo --size "nbd://127.0.0.1:$PORT/$1" >/dev/null 2>&1 && return
		sleep 0.1
	done
	echo "gateway did not start" >&2
	cat "$W/gw.log" >&2
	exit 1
}
stop_gw() { kill "$GW"; wait "$GW" 2>/dev/null || true; GW=; }

mkdir -p "$D"
echo "# Snapshots and backups"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S') UTC; kernel $(uname -r); cpus $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "- goldilocks: $("$GOLDILOCKS" version 2>/dev/null | head -1); fio: $(fio --version)"
echo "- command: \`PARTS=\"$PARTS\" FSYNC=$FSYNC SNAP_GIB=$SNAP_GIB LOAD_S=$LOAD_S SNAPS=$SNAPS BACKUP_GIB=$BACKUP_GIB FILL_GIB=$FILL_GIB CHANGE_PCT=$CHANGE_PCT bash bench/snapshots.sh\`"
echo

# 1. Snapshot create under load.
if part 1; then
say "a ${SNAP_GIB} GiB volume under fio randwrite 4k qd16 for ${LOAD_S} s, ${SNAPS} snapshots"
gl volume create big --size "${SNAP_GIB}G" >/dev/null 2>&1
start_gw big
fio --name=load --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/big" --rw=randwrite --bs=4k --iodepth=16 \
	--time_based --runtime="$LOAD_S" --size="${SNAP_GIB}G" --fsync="$FSYNC" --output-format=json >"$W/load.json" 2>"$W/load.err" &
FIO=$!
sleep 3
echo "## Snapshot create on a ${SNAP_GIB} GiB volume under load"
echo
echo "fio randwrite 4k iodepth 16 over NBD (TCP) for ${LOAD_S} s, a flush every ${FSYNC} writes (0: none); \`volume snapshot create\` every $(((LOAD_S - 6) / SNAPS)) s, through the gateway's control socket."
echo
echo "| snapshot | writes waited (ms) | command wall time (ms) |"
echo "|---|--:|--:|"
for i in $(seq "$SNAPS"); do
	t0=$(now)
	out=$(gl volume snapshot create "big@s$i" --json)
	t1=$(now)
	pause=$(echo "$out" | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["pause_ns"]/1e6))')
	echo "| big@s$i | $pause | $(echo "($t1 - $t0) * 1000 / 1" | bc) |"
	sleep $(((LOAD_S - 6) / SNAPS))
done
wait "$FIO"
iops=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))' "$W/load.json")
echo
echo "fio's write IOPS over the run: $iops."
echo
gl volume snapshot list big | sed 's/^/    /'
echo
stop_gw
gl volume snapshot list big --json | python3 -c 'import json,sys; [print(s["name"]) for s in json.load(sys.stdin)]' | while read -r s; do gl volume snapshot delete "big@$s" >/dev/null; done
gl volume delete big --yes >/dev/null
fi

# 2. Full and incremental backups.
if part 2; then
say "a ${BACKUP_GIB} GiB volume, ${FILL_GIB} GiB written"
gl volume create vol --size "${BACKUP_GIB}G" >/dev/null 2>&1
start_gw vol
fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol" --rw=write --bs=1M --iodepth=8 --size="${FILL_GIB}G" >/dev/null
gl volume snapshot create vol@s0 >/dev/null
stop_gw # backups and exports open the volume here, as a restore does
sync
b0=$(now)
gl volume backup vol@s0 --to "$W/full.glb" --json >"$W/full.json"
b1=$(now)
start_gw vol
change=$((BACKUP_GIB * 1024 * CHANGE_PCT / 100))
say "rewriting ${change} MiB in 64 KiB random blocks"
fio --name=change --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol" --rw=randwrite --bs=64k --iodepth=16 \
	--size="${BACKUP_GIB}G" --io_size="${change}M" >/dev/null
gl volume snapshot create vol@s1 >/dev/null
stop_gw
sync
i0=$(now)
gl volume backup vol@s1 --since s0 --to "$W/incr.glb" --json >"$W/incr.json"
i1=$(now)
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
fr=$(field "$W/full.json" bytes_read)
ir=$(field "$W/incr.json" bytes_read)
fs=$(field "$W/full.json" stream_bytes)
is=$(field "$W/incr.json" stream_bytes)
ft=$(secs "$b0" "$b1")
it=$(secs "$i0" "$i1")
vb=$((BACKUP_GIB << 30))
echo "## Full and incremental backup of a ${BACKUP_GIB} GiB volume"
echo
echo "${FILL_GIB} GiB written by fio (random data), snapshot s0; then ${change} MiB (${CHANGE_PCT} %) rewritten in 64 KiB random blocks, snapshot s1. Commands timed whole (process start to exit), no gateway running."
echo
echo "| backup | read from the snapshot | share of the volume | stream | seconds |"
echo "|---|--:|--:|--:|--:|"
printf '| full of s0 | %s MiB | %.2f %% | %s MiB | %.2f |\n' $((fr >> 20)) "$(echo "$fr * 100 / $vb" | bc -l)" $((fs >> 20)) "$ft"
printf '| incremental s0 → s1 | %s MiB | %.2f %% | %s MiB | %.2f |\n' $((ir >> 20)) "$(echo "$ir * 100 / $vb" | bc -l)" $((is >> 20)) "$it"
echo
printf 'The incremental ran %.1f× faster than the full backup.\n\n' "$(echo "$ft / $it" | bc -l)"
fi

# 3 needs 2's volume and full backup.
if part 2 && part 3; then

# 3. Throughput against export and import.
say "export, restore, import"
sync
e0=$(now)
gl volume export vol --to "$W/vol.raw" >/dev/null
e1=$(now)
sync
r0=$(now)
gl volume restore back --from "$W/full.glb" >/dev/null 2>&1
r1=$(now)
gl volume delete back --yes >/dev/null
sync
m0=$(now)
gl volume import imp --from "$W/vol.raw" >/dev/null
m1=$(now)
mbps() { echo "$vb / 1000000 / $1" | bc -l; }
et=$(secs "$e0" "$e1")
rt=$(secs "$r0" "$r1")
mt=$(secs "$m0" "$m1")
echo "## Throughput over the ${BACKUP_GIB} GiB volume (${FILL_GIB} GiB of data)"
echo
echo "| command | seconds | MB/s of volume |"
echo "|---|--:|--:|"
printf '| volume export (raw plaintext) | %.2f | %.0f |\n' "$et" "$(mbps "$et")"
printf '| volume backup (full, encrypted stream) | %.2f | %.0f |\n' "$ft" "$(mbps "$ft")"
printf '| volume import (raw plaintext) | %.2f | %.0f |\n' "$mt" "$(mbps "$mt")"
printf '| volume restore (the full stream) | %.2f | %.0f |\n' "$rt" "$(mbps "$rt")"
echo
printf 'Backup / export: %.2f; restore / import: %.2f (time ratios: above 1 is slower).\n' "$(echo "$ft / $et" | bc -l)" "$(echo "$rt / $mt" | bc -l)"
fi
say done
