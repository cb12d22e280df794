#!/usr/bin/env bash
# The stall of an upgrade in place (SIGUSR2) under load: 32 volumes (16
# plain, 16 encrypted) each attached by one fio job (ioengine=nbd, random
# 4k reads and writes, qd 4) over the Unix socket, for RUNTIME seconds; in
# the second run the gateway is upgraded UPGRADES times meanwhile. Reported:
# the longest request of each run (fio's completion latency, max over all
# jobs), the IOPS, and the gateway's own stall figure per upgrade (from
# stopping the first connection to the new gateway serving).
#
# Knobs: GOLDILOCKS (binary), RUNTIME (default 20), UPGRADES (default 3),
# KINDS (mixed, plain or encrypted volumes; default mixed), FSYNC (fio's
# fsync=N: an NBD FLUSH every N writes of each job, as a guest's file
# system flushes; default 0, never), KEEP (keep the work dir).
# Prints a Markdown report on stdout; progress on stderr.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
RUNTIME=${RUNTIME:-20}
UPGRADES=${UPGRADES:-3}
VOLS=32
PY=/usr/bin/python3

log() { printf '[upgrade %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "$*"; exit 1; }
for c in fio nbdinfo; do command -v $c >/dev/null || die "$c is missing (make deps)"; done
[[ -x $GOLDILOCKS ]] || die "no $GOLDILOCKS (make build)"

W=$(mktemp -d /tmp/goldilocks-upgrade-bench.XXXXXX)
PID=
cleanup() {
	if [[ -f $W/pid ]]; then kill -9 "$(cat "$W/pid")" 2>/dev/null || true; fi
	[[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
	if [[ -n ${KEEP:-} ]]; then log "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

cp "$GOLDILOCKS" "$W/goldilocks" # the path an upgrade starts again
G=$W/goldilocks
D=$W/data
for ((i = 0; i < VOLS; i++)); do
	if [[ ${KINDS:-mixed} == encrypted ]] || { [[ ${KINDS:-mixed} == mixed ]] && ((i % 2)); }; then
		$G volume create "v$i" --size 64M --data-dir "$D" >/dev/null
	else
		$G volume create "v$i" --size 64M --plain --data-dir "$D" >/dev/null
	fi
done
$G serve --data-dir "$D" --listen "" --metrics "" --pid-file "$W/pid" --log-level info >"$W/log" 2>&1 &
PID=$!
for ((i = 0; i < 100; i++)); do
	nbdinfo --size "nbd+unix:///v0?socket=$D/nbd.sock" >/dev/null 2>&1 && break
	sleep 0.1
done

jobfile() {
	printf '[global]\nioengine=nbd\nrw=randrw\nbs=4k\niodepth=4\ntime_based=1\nruntime=%s\nsize=64m\nthread=1\ngroup_reporting=0\nfsync=%s\n' "$RUNTIME" "${FSYNC:-0}"
	for ((i = 0; i < VOLS; i++)); do
		printf '[v%d]\nuri=nbd+unix:///v%d?socket=%s/nbd.sock\n' "$i" "$i" "$D"
	done
}
jobfile >"$W/jobs.fio"

# One run: fio over every volume; with upgrades, SIGUSR2 at even spacing.
measure() { # name upgrades
	local name=$1 n=$2
	log "$name: fio, $VOLS jobs, ${RUNTIME} s, $n upgrade(s)"
	fio --output-format=json --output="$W/$name.json" "$W/jobs.fio" 2>"$W/$name.err" &
	local fpid=$!
	if ((n > 0)); then
		local gap=$((RUNTIME / (n + 1)))
		for ((u = 1; u <= n; u++)); do
			sleep "$gap"
			local old
			old=$(cat "$W/pid")
			kill -USR2 "$old"
			for ((k = 0; k < 300; k++)); do
				[[ $(cat "$W/pid") != "$old" ]] && ! kill -0 "$old" 2>/dev/null && break
				sleep 0.05
			done
			[[ $(cat "$W/pid") != "$old" ]] || die "upgrade $u did not happen: $(tail -5 "$W/log")"
			log "$name: upgrade $u: pid $old -> $(cat "$W/pid")"
		done
	fi
	wait $fpid || die "fio failed: $(tail -20 "$W/$name.err")"
}
measure baseline 0
measure upgrades "$UPGRADES"

FSYNC=${FSYNC:-0} KINDS=${KINDS:-mixed} $PY - "$W" "$UPGRADES" "$RUNTIME" "$VOLS" "$(uname -r)" "$(nproc)" "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" "$($G --version 2>/dev/null | head -1)" <<'PY'
import json, os, re, sys
w, ups, runtime, vols, kernel, cpus, cpu, ver = sys.argv[1:]
def load(name):
    t = open(f"{w}/{name}.json").read()
    j = json.loads(t[t.index("{"):])
    mx, iops, errs = 0, 0.0, 0
    for job in j["jobs"]:
        errs += job.get("error", 0)
        for d in ("read", "write"):
            mx = max(mx, job[d]["clat_ns"]["max"])
            iops += job[d]["iops"]
    return mx / 1e6, iops, errs
b, u = load("baseline"), load("upgrades")
log = open(f"{w}/log").read()
stalls = [int(s) for s in re.findall(r"stall_ms=(\d+)", log)]
conns = re.findall(r"event=gateway_upgrade .*?connections=(\d+)", log)
print("# Upgrade in place under load\n")
print(f"- {cpus} CPUs ({cpu}), kernel {kernel}; {ver}")
kinds, fsync = os.environ["KINDS"], int(os.environ["FSYNC"])
what = {"mixed": "half plain, half encrypted", "plain": "plain", "encrypted": "encrypted"}[kinds]
flush = f"an NBD FLUSH after every {fsync} writes of each job (fio fsync={fsync})" if fsync else "no FLUSH (fio never flushes: unflushed writes pile up)"
print(f"- {vols} volumes ({what}), one fio job each: ioengine=nbd over the Unix socket, randrw 4k, iodepth 4, {runtime} s, {flush}; `KINDS={kinds} FSYNC={fsync} bash bench/upgrade.sh`")
print(f"- fio errors: baseline {b[2]}, with upgrades {u[2]}\n")
print("| run | IOPS (all jobs) | longest request (ms) |")
print("|---|--:|--:|")
print(f"| no upgrade | {b[1]:,.0f} | {b[0]:.1f} |")
print(f"| {ups} upgrades | {u[1]:,.0f} | {u[0]:.1f} |")
print(f"\nGateway stall per upgrade (ms, first connection stopped to new gateway serving): {', '.join(map(str, stalls))}; connections handed over: {', '.join(conns)}")
PY
