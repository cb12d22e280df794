#!/usr/bin/env bash
# Peer benchmark (run by `make bench`).
#
# Serves the same 2 GiB file with qemu-nbd, nbdkit's file plugin and Goldilocks
# (--plain), and runs the same fio jobs (ioengine=nbd: 4k randread and randwrite
# at iodepth 32, 1 MiB sequential read and write at iodepth 8) and nbdcopy
# against each, alternating servers, over TCP loopback and the Unix socket.
# Prints a Markdown report on stdout: each figure (median of REPS runs) and the
# ratio Goldilocks / best peer. Progress goes to stderr.
#
# Knobs (environment):
#   GOLDILOCKS  binary to test           (default: REPO/bin/goldilocks)
#   RUNTIME     seconds per fio job      (default 15; plus a 2 s ramp)
#   REPS        repetitions per cell     (default 2; the table shows the median)
#   TRANSPORTS  "tcp unix", "tcp", "unix" (default "tcp unix")
#   PORT_BASE   first TCP port tried     (default 10930; ports PORT_BASE..+9)
# Quick check: RUNTIME=3 REPS=1 bash bench/run.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
RUNTIME=${RUNTIME:-15}
REPS=${REPS:-2}
TRANSPORTS=${TRANSPORTS:-"tcp unix"}
PORT_BASE=${PORT_BASE:-10930}
RAMP=2
SIZE_BYTES=$((2 * 1024 * 1024 * 1024))
PY=/usr/bin/python3 # not a pyenv shim: only the standard library is needed

SERVERS=(goldilocks qemu-nbd nbdkit)
JOBS=(randread4k randwrite4k read1m write1m copyread copywrite)

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- checks -----------------------------------------------------------------
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (got '$RUNTIME')"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer (got '$REPS')"
for t in $TRANSPORTS; do
	[[ $t == tcp || $t == unix ]] || die "TRANSPORTS: unknown transport '$t' (tcp, unix)"
done
[[ -n ${TRANSPORTS// /} ]] || die "TRANSPORTS is empty"
for c in qemu-nbd nbdkit fio nbdcopy nbdinfo; do
	command -v "$c" >/dev/null || die "$c not found (apt-get install qemu-utils nbdkit fio libnbd-bin)"
done
[[ -x $PY ]] || die "$PY not found"
[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found or not executable (run make build, or set GOLDILOCKS)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"

# ---- temp dir, servers, cleanup ----------------------------------------------
W=$(mktemp -d /tmp/goldilocks-bench.XXXXXX)
declare -A PID=()  # server name -> pid
CHILD=""           # running client (fio/nbdcopy), if any
FAILED=0

stop_pid() { # pid: SIGTERM, wait up to 10 s, then SIGKILL
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
	trap '' INT TERM HUP
	[[ -n $CHILD ]] && stop_pid "$CHILD"
	for n in "${!PID[@]}"; do stop_pid "${PID[$n]}"; done
	rm -rf "$W"
	exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM
trap 'exit 129' HUP

# Clients run in the background and are waited for, so that a signal to this
# script is handled at once (bash defers traps while a foreground child runs).
run_child() { # log command...: output of the command goes to log
	local log=$1
	shift
	"$@" >>"$log" 2>&1 &
	CHILD=$!
	local rc=0
	wait "$CHILD" || rc=$?
	CHILD=""
	return "$rc"
}

NEXT_PORT=$PORT_BASE
FREE_PORT=""
free_port() { # sets FREE_PORT to a port in PORT_BASE..PORT_BASE+9 that nobody listens on
	while ((NEXT_PORT < PORT_BASE + 10)); do
		FREE_PORT=$NEXT_PORT
		NEXT_PORT=$((NEXT_PORT + 1))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$FREE_PORT") 2>/dev/null; then
			return 0
		fi
	done
	die "no free port in $PORT_BASE..$((PORT_BASE + 9)) (set PORT_BASE)"
}

declare -A URI=() # server name -> NBD URI for the current transport

start_server() { # name uri command...
	local name=$1 uri=$2 i
	shift 2
	"$@" >>"$W/$name.log" 2>&1 &
	PID[$name]=$!
	URI[$name]=$uri
	for ((i = 0; i < 200; i++)); do
		if ! kill -0 "${PID[$name]}" 2>/dev/null; then
			tail -n 20 "$W/$name.log" >&2
			die "$name exited at start"
		fi
		nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	tail -n 20 "$W/$name.log" >&2
	die "$name not ready after 20 s ($uri)"
}

stop_servers() {
	for n in "${!PID[@]}"; do stop_pid "${PID[$n]}"; done
	PID=()
	URI=()
}

start_servers() { # transport
	local t=$1 p
	if [[ $t == tcp ]]; then
		free_port
		p=$FREE_PORT
		start_server goldilocks "nbd://127.0.0.1:$p/disk" \
			"$GOLDILOCKS" serve --data-dir "$D" --listen "127.0.0.1:$p" --unix none --metrics "" --log-level warn
		free_port
		p=$FREE_PORT
		start_server qemu-nbd "nbd://127.0.0.1:$p/disk" \
			qemu-nbd -t -e 4 -f raw -x disk -b 127.0.0.1 -p "$p" "$BASE"
		free_port
		p=$FREE_PORT
		start_server nbdkit "nbd://127.0.0.1:$p/disk" \
			nbdkit -f -i 127.0.0.1 -p "$p" file "$BASE"
		NEXT_PORT=$PORT_BASE # the ports are free again once these servers stop
	else
		start_server goldilocks "nbd+unix:///disk?socket=$D/nbd.sock" \
			"$GOLDILOCKS" serve --data-dir "$D" --listen "" --unix "$D/nbd.sock" --metrics "" --log-level warn
		start_server qemu-nbd "nbd+unix:///disk?socket=$W/qemu-nbd.sock" \
			qemu-nbd -t -e 4 -f raw -x disk -k "$W/qemu-nbd.sock" "$BASE"
		start_server nbdkit "nbd+unix:///disk?socket=$W/nbdkit.sock" \
			nbdkit -f -U "$W/nbdkit.sock" file "$BASE"
	fi
}

# ---- measurements -----------------------------------------------------------
# Each writes one number to $VALUE: IOPS for 4k jobs, MB/s (10^6 bytes/s)
# otherwise. (Not through $(...): a client must run in this shell, see run_child.)
VALUE=$W/value
fio_job() { # uri rw bs iodepth
	local uri=$1 rw=$2 bs=$3 qd=$4 out=$W/fio.json dir=read
	[[ $rw == *write ]] && dir=write
	rm -f "$out"
	run_child "$W/fio.log" fio --name=t --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
		--numjobs=1 --runtime="$RUNTIME" --ramp_time="$RAMP" --time_based \
		--output-format=json --output="$out" || return 1
	"$PY" - "$out" "$dir" "$bs" >"$VALUE" <<'EOF'
import json, sys
path, d, bs = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
if job.get("error"):
    sys.exit("fio job error %s" % job["error"])
v = job[d]["iops"] if bs == "4k" else job[d]["bw_bytes"] / 1e6
if not v > 0:
    sys.exit("fio measured nothing")
print("%.3f" % v)
EOF
}

copy_job() { # uri read|write
	local uri=$1 how=$2 t0 t1
	t0=$(date +%s.%N)
	if [[ $how == read ]]; then
		run_child "$W/nbdcopy.log" nbdcopy -C 1 --no-extents "$uri" null: || return 1
	else
		run_child "$W/nbdcopy.log" nbdcopy -C 1 "$SRC" "$uri" || return 1
	fi
	t1=$(date +%s.%N)
	awk -v a="$t0" -v b="$t1" -v n="$SIZE_BYTES" 'BEGIN { printf "%.3f\n", n / (b - a) / 1e6 }' >"$VALUE"
}

measure() { # job uri
	case $1 in
	randread4k) fio_job "$2" randread 4k 32 ;;
	randwrite4k) fio_job "$2" randwrite 4k 32 ;;
	read1m) fio_job "$2" read 1M 8 ;;
	write1m) fio_job "$2" write 1M 8 ;;
	copyread) copy_job "$2" read ;;
	copywrite) copy_job "$2" write ;;
	esac
}

# ---- header -----------------------------------------------------------------
first_line() { "$@" 2>/dev/null | head -n 1 || true; }
gl_version=$("$GOLDILOCKS" --version 2>/dev/null | head -n 1) || gl_version=""
gl_commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || gl_commit=""
if [[ -n $gl_commit ]] && [[ -n $(git -C "$REPO" status --porcelain 2>/dev/null | head -n 1) ]]; then
	gl_commit+="-dirty"
fi
cpu=$(grep -m 1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') || cpu=unknown

echo "# Goldilocks peer benchmark"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "- kernel: $(uname -r); cpus: $(nproc); cpu: ${cpu:-unknown}"
echo "- qemu-nbd: $(first_line qemu-nbd --version)"
echo "- nbdkit: $(first_line nbdkit --version)"
echo "- fio: $(first_line fio --version)"
echo "- nbdcopy: $(first_line nbdcopy --version)"
echo "- goldilocks: ${gl_version:-(no --version)}; binary $GOLDILOCKS${gl_commit:+; repo at $gl_commit}"
echo "- method: one 2 GiB file of random data in page cache, served by all three servers" \
	"(Goldilocks volume --plain --backing it); fio ioengine=nbd numjobs=1, ${RUNTIME} s + ${RAMP} s ramp;" \
	"nbdcopy -C 1 of the whole 2 GiB (read to null:, write from a second file);" \
	"servers alternate job by job, order rotated; each figure is the median of ${REPS} run(s); MB = 10^6 bytes"
echo

# ---- data -------------------------------------------------------------------
BASE=$W/base.raw
SRC=$W/src.raw
D=$W/gl
log "temp dir $W; writing the 2 GiB base file (random data)"
head -c "$SIZE_BYTES" /dev/urandom >"$BASE"
cp "$BASE" "$SRC"
cat "$BASE" "$SRC" >/dev/null # page cache
mkdir -p "$D"
"$GOLDILOCKS" volume create disk --plain --backing "$BASE" --data-dir "$D" >&2

RESULTS=$W/results.tsv
: >"$RESULTS"
nserv=${#SERVERS[@]}
for t in $TRANSPORTS; do
	log "transport $t: starting servers"
	start_servers "$t"
	for ((r = 0; r < REPS; r++)); do
		for ((j = 0; j < ${#JOBS[@]}; j++)); do
			job=${JOBS[$j]}
			for ((k = 0; k < nserv; k++)); do
				s=${SERVERS[$(((k + r + j) % nserv))]}
				if ! kill -0 "${PID[$s]}" 2>/dev/null; then
					log "$t rep $((r + 1))/$REPS $job $s: server is not running"
					tail -n 5 "$W/$s.log" >&2 || true
					v=fail
				elif rm -f "$VALUE" && measure "$job" "${URI[$s]}" && read -r v <"$VALUE"; then
					:
				else
					log "$t rep $((r + 1))/$REPS $job $s: FAILED"
					tail -n 5 "$W/fio.log" "$W/nbdcopy.log" >&2 2>/dev/null || true
					v=fail
				fi
				[[ $v == fail ]] && FAILED=1
				log "$t rep $((r + 1))/$REPS $job $s: $v"
				printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$job" "$s" "$r" "$v" >>"$RESULTS"
			done
		done
	done
	log "transport $t: stopping servers"
	stop_servers
done

# ---- report -----------------------------------------------------------------
"$PY" - "$RESULTS" "$TRANSPORTS" <<'EOF'
import statistics, sys
path, transports = sys.argv[1], sys.argv[2].split()
servers = ["goldilocks", "qemu-nbd", "nbdkit"]
jobs = [
    ("randread4k", "fio randread 4k qd32 (IOPS)"),
    ("randwrite4k", "fio randwrite 4k qd32 (IOPS)"),
    ("read1m", "fio read 1M qd8 (MB/s)"),
    ("write1m", "fio write 1M qd8 (MB/s)"),
    ("copyread", "nbdcopy read (MB/s)"),
    ("copywrite", "nbdcopy write (MB/s)"),
]
runs = {}
for line in open(path):
    t, job, s, r, v = line.rstrip("\n").split("\t")
    runs.setdefault((t, job, s), []).append(None if v == "fail" else float(v))

def med(key):
    vs = runs.get(key, [])
    if not vs or None in vs:
        return None
    return statistics.median(vs)

def fmt(v):
    return "fail" if v is None else "{:,.0f}".format(v)

for t in transports:
    print("## %s" % ("TCP loopback" if t == "tcp" else "Unix socket"))
    print()
    print("| job | goldilocks | qemu-nbd | nbdkit | goldilocks / best peer |")
    print("|---|--:|--:|--:|--:|")
    for job, label in jobs:
        g, q, k = (med((t, job, s)) for s in servers)
        ratio = "n/a" if None in (g, q, k) else "%.2f" % (g / max(q, k))
        print("| %s | %s | %s | %s | %s |" % (label, fmt(g), fmt(q), fmt(k), ratio))
    print()

print("<details><summary>all runs</summary>")
print()
for t in transports:
    for job, label in jobs:
        cells = []
        for s in servers:
            vs = runs.get((t, job, s), [])
            cells.append("%s %s" % (s, " ".join("fail" if v is None else "%.0f" % v for v in vs)))
        print("- %s, %s: %s" % (t, label, "; ".join(cells)))
print()
print("</details>")
EOF

if ((FAILED)); then
	log "some measurements failed (shown as 'fail')"
	exit 1
fi
log "done"
