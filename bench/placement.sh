#!/usr/bin/env bash
# Where qemu-nbd's thread runs, and what that does to the upstream
# comparison of bench/storage.sh. qemu-nbd (--cache=none --aio=native on a
# 1 GiB raw file of random data) is pinned to each CPU in turn with
# taskset; with it pinned, fio (ioengine=nbd) runs one job against
# qemu-nbd directly and one through Goldilocks in front of it (a plain
# volume with --backing nbd+unix://…). fio and the gateway are not pinned.
# The report names the CPU that takes the disk's interrupts, from
# /proc/interrupts. Markdown on stdout, progress on stderr.
#
# Knobs: RW (randwrite), BS (4k), QD (32), RUNTIME (s per job, 6),
#        REPS (3), CPUS (all of them: "0 1 …"), DISK_IRQ (the
#        /proc/interrupts name of the disk's queue, default virtio1-req.0),
#        GOLDILOCKS (binary, default REPO/bin/goldilocks).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
RW=${RW:-randwrite}
BS=${BS:-4k}
QD=${QD:-32}
RUNTIME=${RUNTIME:-6}
REPS=${REPS:-3}
CPUS=${CPUS:-$(seq -s ' ' 0 $(($(nproc) - 1)))}
DISK_IRQ=${DISK_IRQ:-virtio1-req.0}

log() { printf '[placement %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in qemu-nbd fio taskset python3; do
	command -v "$c" >/dev/null || die "$c not found (make deps)"
done
[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found (make build)"

W=$(mktemp -d /tmp/goldilocks-placement.XXXXXX)
QP= GP=
stop() {
	if [[ -n $1 ]]; then
		kill "$1" 2>/dev/null || true
		wait "$1" 2>/dev/null || true
	fi
}
cleanup() {
	stop "$GP"
	stop "$QP"
	rm -rf "$W"
}
trap cleanup EXIT

# irq_cpus: the CPUs that took the disk queue's interrupts so far.
irq_cpus() {
	awk -v n="$DISK_IRQ" '$NF == n { for (i = 2; i < NF - 2; i++) if ($i + 0 > 0) printf "%d ", i - 2 }' /proc/interrupts
}

# job URI: one fio job, its IOPS (4k) or MB/s.
job() {
	fio --name=t --ioengine=nbd --uri="$1" --rw="$RW" --bs="$BS" --iodepth="$QD" --numjobs=1 \
		--runtime="$RUNTIME" --ramp_time=2 --time_based --output-format=json --output="$W/f.json" >/dev/null 2>&1
	python3 - "$W/f.json" "$RW" "$BS" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write" if "write" in sys.argv[2] else "read"]
print("%.0f" % (d["iops"] if sys.argv[3] == "4k" else d["bw_bytes"] / 1e6))
EOF
}

log "writing a 1 GiB raw file of random data"
head -c 1G /dev/urandom >"$W/up.raw"
sync
D=$W/gl
declare -A RES=()
for ((r = 1; r <= REPS; r++)); do
	for cpu in $CPUS; do
		taskset -c "$cpu" qemu-nbd -t -e 16 -f raw --cache=none --aio=native -k "$W/q.sock" -x disk "$W/up.raw" &
		QP=$!
		for ((i = 0; i < 100; i++)); do [[ -S $W/q.sock ]] && break; sleep 0.05; done
		if [[ ! -d $D ]]; then
			"$GOLDILOCKS" --data-dir "$D" volume create disk --plain --backing "nbd+unix:///disk?socket=$W/q.sock" >/dev/null
		fi
		v=$(job "nbd+unix:///disk?socket=$W/q.sock")
		log "rep $r qemu-nbd on CPU $cpu, direct: $v"
		RES[direct,$cpu]+="$v "
		"$GOLDILOCKS" --data-dir "$D" serve --listen "" --metrics "" --log-level warn >"$W/gl.log" 2>&1 &
		GP=$!
		for ((i = 0; i < 100; i++)); do [[ -S $D/nbd.sock ]] && break; sleep 0.05; done
		v=$(job "nbd+unix:///disk?socket=$D/nbd.sock")
		log "rep $r qemu-nbd on CPU $cpu, through goldilocks: $v"
		RES[gl,$cpu]+="$v "
		stop "$GP"
		GP=
		stop "$QP"
		QP=
		rm -f "$W/q.sock"
	done
done

unit=IOPS
[[ $BS == 4k ]] || unit=MB/s
echo "# qemu-nbd's CPU and the upstream comparison"
echo
echo "- machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
echo "- fio $RW bs=$BS qd$QD, ${RUNTIME} s + 2 s ramp per job; $REPS repetitions; qemu-nbd pinned (taskset), fio and the gateway not"
echo "- the disk's interrupts ($DISK_IRQ) were taken by CPU(s): $(irq_cpus)"
echo
echo "| qemu-nbd on | direct ($unit) | through goldilocks ($unit) | ratio per repetition | ratio of medians |"
echo "|---|--:|--:|--:|--:|"
for cpu in $CPUS; do
	python3 - "$cpu" "${RES[direct,$cpu]}" "${RES[gl,$cpu]}" <<'EOF'
import statistics, sys
cpu, d, g = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
per = ", ".join("%.2f" % (b / a) for a, b in zip(d, g))
print("| CPU %s | %s | %s | %s | %.2f |" % (cpu, " / ".join("%.0f" % x for x in d), " / ".join("%.0f" % x for x in g), per, statistics.median(g) / statistics.median(d)))
EOF
done
