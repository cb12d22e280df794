#!/usr/bin/env bash
# Storage-backend benchmark (run by `make bench`): Goldilocks in front of
# Ceph RBD and of an upstream NBD server, against the peers that reach the
# same storage directly. One run, one machine, servers alternating job by
# job. Markdown report on stdout, progress on stderr.
#
#   RBD (a single-node cluster from e2e/testdata/ceph-up.sh, one image each):
#     goldilocks plain on rbd:     vs qemu-nbd -f raw rbd:…          (QEMU's rbd driver)
#     goldilocks encrypted on rbd: vs qemu-nbd --image-opts driver=luks,file=rbd:…
#   Upstream NBD (a 1 GiB raw file served by qemu-nbd on a Unix socket):
#     client -> goldilocks -> qemu-nbd  vs  client -> qemu-nbd
#
# fio ioengine=nbd: 4k randread and randwrite qd32, 1 MiB read and write
# qd8. Every disk is written in full once before its first job
# (preconditioning, untimed).
#
# Knobs: RUNTIME (s per job, default 10), REPS (default 2, median shown),
#        GOLDILOCKS (binary, default REPO/bin/goldilocks, built with Ceph),
#        SETS ("rbd upstream", default both), QUIET (s of no gateway CPU
#        after a Goldilocks job before the next, default 6; settle.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-2}
SETS=${SETS:-"rbd upstream"}
RAMP=2
PY=/usr/bin/python3
# shellcheck source=bench/settle.sh
. "$REPO/bench/settle.sh"
QUIET=${QUIET:-6}
SIZE=1G

log() { printf '[storage %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in qemu-nbd qemu-img fio nbdcopy rbd ceph-mon; do
	command -v "$c" >/dev/null || die "$c not found (make deps)"
done
[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found (make build)"

W=$(mktemp -d /tmp/goldilocks-storage.XXXXXX)
declare -A PID=()
CEPH_UP=0
stop_pid() {
	local p=$1 i
	kill -TERM "$p" 2>/dev/null || return 0
	for ((i = 0; i < 100; i++)); do
		kill -0 "$p" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$p" 2>/dev/null || true
	wait "$p" 2>/dev/null || true
}
cleanup() {
	local rc=$?
	set +e
	for n in "${!PID[@]}"; do stop_pid "${PID[$n]}"; done
	((CEPH_UP)) && BASE=$W/ceph bash "$REPO/e2e/testdata/ceph-down.sh" >/dev/null 2>&1
	rm -rf "$W"
	exit "$rc"
}
trap cleanup EXIT

wait_sock() { # path
	local i
	for ((i = 0; i < 200; i++)); do
		[[ -S $1 ]] && return 0
		sleep 0.05
	done
	die "no socket at $1"
}

# start NAME SOCKET command...: a server on a Unix socket.
start() {
	local name=$1 sock=$2
	shift 2
	"$@" >"$W/$name.log" 2>&1 &
	PID[$name]=$!
	wait_sock "$sock"
}

RESULTS=$W/results.tsv
: >"$RESULTS"
VALUE=$W/value
fio_job() { # uri rw bs qd
	local out=$W/fio.json dir=read
	[[ $2 == *write ]] && dir=write
	fio --name=t --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --numjobs=1 \
		--runtime="$RUNTIME" --ramp_time="$RAMP" --time_based --output-format=json --output="$out" >/dev/null 2>&1 ||
		return 1
	"$PY" - "$out" "$dir" "$3" >"$VALUE" <<'EOF'
import json, sys
path, d, bs = sys.argv[1:]
j = json.load(open(path))["jobs"][0]
print("%.3f" % (j[d]["iops"] if bs == "4k" else j[d]["bw_bytes"] / 1e6))
EOF
}
JOBS=(randread4k randwrite4k read1m write1m)
measure() { # job uri
	case $1 in
	randread4k) fio_job "$2" randread 4k 32 ;;
	randwrite4k) fio_job "$2" randwrite 4k 32 ;;
	read1m) fio_job "$2" read 1M 8 ;;
	write1m) fio_job "$2" write 1M 8 ;;
	esac
}

# compare SET "name uri" ...: alternate the servers job by job, REPS times.
# The first server is Goldilocks, whose process is GLPID. One client stays
# attached to each server throughout, as a VM would; before each job every
# server gets an NBD FLUSH and the page cache a `sync`, and after a
# Goldilocks job the gateway's idle work runs first (settle.sh).
compare() {
	local set=$1 r j k n=$(($# - 1)) last=-1
	shift
	local -a names=() uris=()
	for s in "$@"; do
		names+=("${s%% *}")
		uris+=("${s#* }")
	done
	for ((k = 0; k < n; k++)); do # precondition: write each disk in full once
		log "$set: preconditioning ${names[$k]}"
		nbdcopy -C 1 "$W/src.raw" "${uris[$k]}" || die "preconditioning ${names[$k]}"
	done
	local -a holds=()
	for ((k = 0; k < n; k++)); do
		hold "${uris[$k]}" "$W/hold.log"
		holds+=("$HOLD_PID")
	done
	for ((r = 0; r < REPS; r++)); do
		for j in "${JOBS[@]}"; do
			for ((k = 0; k < n; k++)); do
				local i=$(((k + r) % n)) v u
				for u in "${uris[@]}"; do
					nbd_flush "$u" "$W/flush.log" || log "$set: flush of $u failed"
				done
				sync
				if ((last == 0)); then
					wait_quiet "$GLPID" "$QUIET"
					sync
				fi
				last=$i
				if measure "$j" "${uris[$i]}" && read -r v <"$VALUE"; then :; else v=fail; fi
				log "$set rep $((r + 1))/$REPS $j ${names[$i]}: $v"
				printf '%s\t%s\t%s\t%s\n' "$set" "$j" "${names[$i]}" "$v" >>"$RESULTS"
			done
		done
	done
	for k in "${holds[@]}"; do stop_pid "$k"; done
}

log "temp dir $W"
head -c 1073741824 /dev/urandom >"$W/src.raw"
printf 'bench-pass' >"$W/luks.pass"

if [[ " $SETS " == *" rbd "* ]]; then
	log "rbd: bringing up a single-node Ceph cluster"
	BASE=$W/ceph IMG=qemu IMG_SIZE=$SIZE OSD_SIZE=21474836480 bash "$REPO/e2e/testdata/ceph-up.sh" >"$W/ceph-up.log" 2>&1 ||
		{ cat "$W/ceph-up.log" >&2; die "ceph-up failed"; }
	CEPH_UP=1
	export CEPH_CONF=$W/ceph/ceph.conf
	rbd create rbd/gl --size "$SIZE"
	rbd create rbd/gl-enc --size 2200M # a 1 GiB encrypted volume's layout
	# qemu-img times its PBKDF and now and then cannot ("Unable to get
	# accurate CPU usage"): a second or third try.
	for try in 1 2 3; do
		qemu-img create -f luks --object secret,id=s0,file="$W/luks.pass" -o key-secret=s0,iter-time=10 \
			"rbd:rbd/luks:conf=$CEPH_CONF" "$SIZE" >/dev/null && break
		((try < 3)) || die "qemu-img create of the LUKS image failed"
		rbd rm rbd/luks >/dev/null 2>&1 || true
	done
	D=$W/gl-rbd
	"$GOLDILOCKS" --data-dir "$D" volume create disk --plain --backing rbd:rbd/gl --ceph-conf "$CEPH_CONF" >&2
	"$GOLDILOCKS" --data-dir "$D" volume create enc --size "$SIZE" --backing rbd:rbd/gl-enc --ceph-conf "$CEPH_CONF" >&2
	start gl-rbd "$D/nbd.sock" "$GOLDILOCKS" serve --data-dir "$D" --listen "" --metrics "" --log-level warn
	start qemu-rbd "$W/qemu-rbd.sock" qemu-nbd -t -e 4 -f raw --cache=none -k "$W/qemu-rbd.sock" -x disk "rbd:rbd/qemu:conf=$CEPH_CONF"
	start qemu-rbd-luks "$W/qemu-luks.sock" qemu-nbd -t -e 4 -k "$W/qemu-luks.sock" -x disk --cache=none \
		--object "secret,id=s0,file=$W/luks.pass" --image-opts "driver=luks,key-secret=s0,file.driver=rbd,file.pool=rbd,file.image=luks,file.conf=$CEPH_CONF"
	GLPID=${PID[gl-rbd]}
	compare rbd-plain "goldilocks nbd+unix:///disk?socket=$D/nbd.sock" "qemu-nbd nbd+unix:///disk?socket=$W/qemu-rbd.sock"
	compare rbd-encrypted "goldilocks nbd+unix:///enc?socket=$D/nbd.sock" "qemu-nbd+luks nbd+unix:///disk?socket=$W/qemu-luks.sock"
	for n in gl-rbd qemu-rbd qemu-rbd-luks; do stop_pid "${PID[$n]}"; unset "PID[$n]"; done
fi

if [[ " $SETS " == *" upstream "* ]]; then
	log "upstream: qemu-nbd on a raw file, and Goldilocks in front of it"
	truncate -s "$SIZE" "$W/up.raw"
	start qemu-up "$W/qemu-up.sock" qemu-nbd -t -e 8 -f raw --cache=none --aio=native -k "$W/qemu-up.sock" -x disk "$W/up.raw"
	D=$W/gl-up
	"$GOLDILOCKS" --data-dir "$D" volume create disk --plain --backing "nbd+unix:///disk?socket=$W/qemu-up.sock" >&2
	start gl-up "$D/nbd.sock" "$GOLDILOCKS" serve --data-dir "$D" --listen "" --metrics "" --log-level warn
	GLPID=${PID[gl-up]}
	compare upstream "goldilocks->qemu-nbd nbd+unix:///disk?socket=$D/nbd.sock" "qemu-nbd nbd+unix:///disk?socket=$W/qemu-up.sock"
fi

"$PY" - "$RESULTS" "$GOLDILOCKS" "$RUNTIME" "$REPS" <<'EOF'
import statistics, subprocess, sys, platform
path, gl, runtime, reps = sys.argv[1:]
rows = {}
order = []
for line in open(path):
    st, job, srv, v = line.rstrip("\n").split("\t")
    if (st, srv) not in order:
        order.append((st, srv))
    rows.setdefault((st, job, srv), []).append(None if v == "fail" else float(v))
def med(k):
    vs = rows.get(k, [])
    return None if not vs or None in vs else statistics.median(vs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
ver = subprocess.run([gl, "version"], capture_output=True, text=True).stdout.strip()
print("# Goldilocks storage-backend benchmark\n")
print("- kernel %s; cpus %d; cpu %s" % (platform.release(), __import__("os").cpu_count(), cpu))
print("- %s; fio ioengine=nbd, %s s + 2 s ramp per job, median of %s; every disk written once before its first job; one client attached to each server throughout; before each job an NBD FLUSH to every server and `sync`, and after a Goldilocks job a wait until the gateway has used no CPU for %s s (its idle work)" % (ver, runtime, reps, __import__("os").environ.get("QUIET", "6")))
print("- RBD: single-node Ceph 16.2 (one BlueStore OSD on a sparse file on this VM's disk, pool size 1); upstream: qemu-nbd --aio=native --cache=none on a raw file, Unix sockets throughout\n")
labels = {"randread4k": "4k randread qd32 (IOPS)", "randwrite4k": "4k randwrite qd32 (IOPS)", "read1m": "1 MiB read qd8 (MB/s)", "write1m": "1 MiB write qd8 (MB/s)"}
sets = []
for st, _ in order:
    if st not in sets:
        sets.append(st)
for st in sets:
    srvs = [s for t, s in order if t == st]
    print("## %s\n" % st)
    print("| job | %s | ratio |" % " | ".join(srvs))
    print("|---|%s--:|" % ("--:|" * len(srvs)))
    for job in ["randread4k", "randwrite4k", "read1m", "write1m"]:
        vals = [med((st, job, s)) for s in srvs]
        ratio = "n/a" if None in vals else "%.2f" % (vals[0] / vals[1])
        print("| %s | %s | %s |" % (labels[job], " | ".join("fail" if v is None else "{:,.0f}".format(v) for v in vals), ratio))
    print()
print("<details><summary>all runs</summary>\n")
for (st, job, srv), vs in sorted(rows.items()):
    print("- %s %s %s: %s" % (st, job, srv, " ".join("fail" if v is None else "%.0f" % v for v in vs)))
print("\n</details>")
EOF
log done
