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
# The encrypted set does the same with encrypted volumes: Goldilocks serving a
# default (AES-256-GCM) volume imported from that file, against qemu-nbd serving
# a QEMU LUKS image (qemu-img create -f luks, aes-256-xts; --image-opts
# driver=luks) and nbdkit's file plugin with its luks filter on the same image.
# The LUKS image is made with a PBKDF time of LUKS_ITER_MS: nbdkit's luks filter
# derives the key again on every connection (about 2.3 s at qemu-img's default
# of 2000 ms), and nbdcopy's timing includes its connection. The report shows
# each encrypted server's connection setup time (one nbdinfo --size).
#
# Knobs (environment):
#   GOLDILOCKS  binary to test           (default: REPO/bin/goldilocks)
#   RUNTIME     seconds per fio job      (default 15; plus a 2 s ramp)
#   REPS        repetitions per cell     (default 2; the table shows the median)
#   TRANSPORTS  "tcp unix", "tcp", "unix" (default "tcp unix")
#   SETS        "plain encrypted", "plain", "encrypted" (default "plain encrypted")
#   LUKS_ITER_MS  qemu-img luks iter-time in ms (default 10; qemu-img's own is 2000)
#   PORT_BASE   first TCP port tried     (default 10930; ports PORT_BASE..+9)
#   QUIET       seconds the gateway must use no CPU after its job before the
#               next job starts (default 6: its idle work runs untimed)
#   JOBS        which jobs, in order     (default: all; randread4k randwrite4k
#               randwrite4ksync read1m write1m copyread copywrite)
#   STEAL_MAX   a run during which the hypervisor took more than this share
#               of the CPUs (steal, % of /proc/stat time) is measured again
#               (default 10; 100: never), at most STEAL_RETRIES times
#               (default 2): on a shared VM steal comes in bursts of
#               seconds, and a burst in one server's run decides its cell
# Quick check: RUNTIME=3 REPS=1 bash bench/run.sh
# Encrypted only, TCP only: SETS=encrypted TRANSPORTS=tcp RUNTIME=5 REPS=1 bash bench/run.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
RUNTIME=${RUNTIME:-15}
REPS=${REPS:-2}
TRANSPORTS=${TRANSPORTS:-"tcp unix"}
SETS=${SETS:-"plain encrypted"}
LUKS_ITER_MS=${LUKS_ITER_MS:-10}
PORT_BASE=${PORT_BASE:-10930}
STEAL_MAX=${STEAL_MAX:-10}
STEAL_RETRIES=${STEAL_RETRIES:-2}
RAMP=2
SIZE_BYTES=$((2 * 1024 * 1024 * 1024))
PY=/usr/bin/python3 # not a pyenv shim: the standard library and Debian's python3-libnbd
# shellcheck source=bench/settle.sh
. "$REPO/bench/settle.sh"

SERVERS_plain=(goldilocks qemu-nbd nbdkit)
SERVERS_encrypted=(goldilocks-enc qemu-nbd-luks nbdkit-luks)
LUKS_PASS=bench-passphrase
read -r -a JOBS <<<"${JOBS:-randread4k randwrite4k randwrite4ksync read1m write1m copyread copywrite}"

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for j in "${JOBS[@]}"; do
	case $j in
	randread4k | randwrite4k | randwrite4ksync | read1m | write1m | copyread | copywrite) ;;
	*) die "unknown job in JOBS: $j" ;;
	esac
done

# ---- checks -----------------------------------------------------------------
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (got '$RUNTIME')"
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer (got '$REPS')"
for t in $TRANSPORTS; do
	[[ $t == tcp || $t == unix ]] || die "TRANSPORTS: unknown transport '$t' (tcp, unix)"
done
[[ -n ${TRANSPORTS// /} ]] || die "TRANSPORTS is empty"
ENCRYPTED=0
for s in $SETS; do
	[[ $s == plain || $s == encrypted ]] || die "SETS: unknown set '$s' (plain, encrypted)"
	[[ $s == encrypted ]] && ENCRYPTED=1
done
[[ -n ${SETS// /} ]] || die "SETS is empty"
[[ $LUKS_ITER_MS =~ ^[1-9][0-9]*$ ]] || die "LUKS_ITER_MS must be a positive integer (got '$LUKS_ITER_MS')"
for c in qemu-nbd nbdkit fio nbdcopy nbdinfo; do
	command -v "$c" >/dev/null || die "$c not found (apt-get install qemu-utils nbdkit fio libnbd-bin)"
done
if ((ENCRYPTED)); then
	command -v qemu-img >/dev/null || die "qemu-img not found (apt-get install qemu-utils)"
	nbdkit --dump-plugin file >/dev/null 2>&1 && nbdkit --filter=luks file --dump-plugin >/dev/null 2>&1 ||
		die "this nbdkit has no luks filter (nbdkit >= 1.32)"
fi
[[ -x $PY ]] || die "$PY not found"
[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found or not executable (run make build, or set GOLDILOCKS)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"

# ---- temp dir, servers, cleanup ----------------------------------------------
W=$(mktemp -d /tmp/goldilocks-bench.XXXXXX)
declare -A PID=()  # server name -> pid
declare -A HOLD=() # server name -> pid of the client that stays attached to it
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
	for n in "${!HOLD[@]}"; do stop_pid "${HOLD[$n]}"; done
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

CONNECT=$W/connect.tsv # transport, server, seconds of one nbdinfo --size once ready
start_server() { # name uri command...
	local name=$1 uri=$2 i t0 t1 deadline=$((SECONDS + 60))
	shift 2
	"$@" >>"$W/$name.log" 2>&1 &
	PID[$name]=$!
	URI[$name]=$uri
	# Each probe is a full NBD connection (a key derivation for the luks
	# filter), hence a deadline in seconds rather than a count of probes.
	while ((SECONDS < deadline)); do
		if ! kill -0 "${PID[$name]}" 2>/dev/null; then
			tail -n 20 "$W/$name.log" >&2
			die "$name exited at start"
		fi
		if nbdinfo --size "$uri" >/dev/null 2>&1; then
			t0=$(date +%s.%N)
			nbdinfo --size "$uri" >/dev/null 2>&1 || die "$name: second nbdinfo failed ($uri)"
			t1=$(date +%s.%N)
			printf '%s\t%s\t%s\n' "$CUR_T" "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >>"$CONNECT"
			# One client stays attached through the run, as a running VM
			# does: a Goldilocks volume is open only while attached, and
			# its idle work (checkpoints, home alignment) needs it open.
			hold "$uri" "$W/$name.log"
			HOLD[$name]=$HOLD_PID
			return 0
		fi
		sleep 0.1
	done
	tail -n 20 "$W/$name.log" >&2
	die "$name not ready after 60 s ($uri)"
}

stop_servers() {
	for n in "${!HOLD[@]}"; do stop_pid "${HOLD[$n]}"; done
	HOLD=()
	for n in "${!PID[@]}"; do stop_pid "${PID[$n]}"; done
	PID=()
	URI=()
}

LUKS_OPTS=driver=luks,key-secret=sec0 # plus file.filename=

start_servers() { # set transport
	local set=$1 t=$2
	CUR_T=$t
	if [[ $set == encrypted ]]; then
		start_servers_encrypted "$t"
		return
	fi
	local p
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

start_servers_encrypted() { # transport
	local t=$1 p
	if [[ $t == tcp ]]; then
		free_port
		p=$FREE_PORT
		start_server goldilocks-enc "nbd://127.0.0.1:$p/disk" \
			"$GOLDILOCKS" serve --data-dir "$D2" --listen "127.0.0.1:$p" --unix none --metrics "" --log-level warn
		free_port
		p=$FREE_PORT
		start_server qemu-nbd-luks "nbd://127.0.0.1:$p/disk" \
			qemu-nbd -t -e 4 -x disk -b 127.0.0.1 -p "$p" --object "secret,id=sec0,file=$PASSFILE" \
			--image-opts "$LUKS_OPTS,file.filename=$LUKS"
		free_port
		p=$FREE_PORT
		start_server nbdkit-luks "nbd://127.0.0.1:$p/disk" \
			nbdkit -f -i 127.0.0.1 -p "$p" file "$LUKS" --filter=luks "passphrase=+$PASSFILE"
		NEXT_PORT=$PORT_BASE
	else
		start_server goldilocks-enc "nbd+unix:///disk?socket=$D2/nbd.sock" \
			"$GOLDILOCKS" serve --data-dir "$D2" --listen "" --unix "$D2/nbd.sock" --metrics "" --log-level warn
		start_server qemu-nbd-luks "nbd+unix:///disk?socket=$W/qemu-nbd-luks.sock" \
			qemu-nbd -t -e 4 -x disk -k "$W/qemu-nbd-luks.sock" --object "secret,id=sec0,file=$PASSFILE" \
			--image-opts "$LUKS_OPTS,file.filename=$LUKS"
		start_server nbdkit-luks "nbd+unix:///disk?socket=$W/nbdkit-luks.sock" \
			nbdkit -f -U "$W/nbdkit-luks.sock" file "$LUKS" --filter=luks "passphrase=+$PASSFILE"
	fi
}

# ---- measurements -----------------------------------------------------------
# Each writes one number to $VALUE: IOPS for 4k jobs, MB/s (10^6 bytes/s)
# otherwise. (Not through $(...): a client must run in this shell, see run_child.)
VALUE=$W/value
fio_job() { # uri rw bs iodepth [fio option...]
	local uri=$1 rw=$2 bs=$3 qd=$4 out=$W/fio.json dir=read
	shift 4
	[[ $rw == *write ]] && dir=write
	rm -f "$out"
	run_child "$W/fio.log" fio --name=t --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
		--numjobs=1 --runtime="$RUNTIME" --ramp_time="$RAMP" --time_based "$@" \
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

# settle makes every server's writes durable before a job (not timed): an
# NBD FLUSH to each (a Goldilocks volume commits; the peers fdatasync),
# then `sync` writes back every dirty page. A server that leaves its
# writes in the page cache would otherwise have the kernel write them back
# during the next server's job, which then pays for them. After a
# Goldilocks job it also waits until the gateway has used no CPU for
# QUIET seconds: its idle work (a checkpoint 5 s after the last commit,
# home alignment 2 s after the last request) then runs here, untimed,
# rather than inside the next server's job.
QUIET=${QUIET:-6}
LAST="" # server of the previous job
settle() {
	local n
	for n in "${!URI[@]}"; do
		nbd_flush "${URI[$n]}" "$W/flush.log" || log "flush of $n failed"
	done
	sync
	if [[ $LAST == goldilocks* && -n ${PID[$LAST]:-} ]]; then
		wait_quiet "${PID[$LAST]}" "$QUIET"
		sync
	fi
}

# precondition writes every byte of each server's disk once (nbdcopy of the
# source file, flushed at its end; not timed) before the first job of a set,
# so that every job measures the steady state rather than a store's first
# writes: storage benchmarks precondition the same way (SNIA PTS). A peer's
# image was already written in full; a Goldilocks encrypted volume keeps two
# homes per chunk (crypto/FORMAT.md) of which an import writes one, and the
# first write of the other allocates file blocks (ext4 extents, a journal
# commit at the next fdatasync) that steady state never pays.
precondition() {
	local s
	for s in "${SERVERS[@]}"; do
		log "$set: preconditioning $s (one write of the whole disk)"
		copy_job "${URI[$s]}" write || die "preconditioning $s failed"
	done
}

# steal_ticks prints the CPU time so far and the part of it stolen by the
# hypervisor (jiffies, all CPUs; /proc/stat's first line).
steal_ticks() {
	local _c u n s i w q sq st
	read -r _c u n s i w q sq st _ </proc/stat
	echo "$((u + n + s + i + w + q + sq + st)) $st"
}

# measure_steady runs measure (job uri) and sets STEAL to the steal of
# the run, in percent; a run above STEAL_MAX is measured again (settled
# first), at most STEAL_RETRIES times, and the last run counts.
STEAL=0
RETRIED=0
measure_steady() { # job uri
	local try t0 s0 t1 s1
	for ((try = 0; ; try++)); do
		read -r t0 s0 < <(steal_ticks)
		measure "$1" "$2" || return 1
		read -r t1 s1 < <(steal_ticks)
		STEAL=$(((s1 - s0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
		((STEAL > STEAL_MAX && try < STEAL_RETRIES)) || return 0
		log "$1 on ${2%%\?*}: $STEAL % steal during the run; measured again"
		RETRIED=$((RETRIED + 1))
		settle || return 1
	done
}

measure() { # job uri
	case $1 in
	randread4k) fio_job "$2" randread 4k 32 ;;
	randwrite4k) fio_job "$2" randwrite 4k 32 ;;
	randwrite4ksync) fio_job "$2" randwrite 4k 1 --fsync=1 ;; # NBD FLUSH; fio's nbd engine refuses --fdatasync
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
echo "- method: one 2 GiB file of random data in page cache, served by all three servers of the plain set" \
	"(Goldilocks volume --plain --backing it) and copied into the encrypted set's volumes; fio ioengine=nbd numjobs=1, ${RUNTIME} s + ${RAMP} s ramp;" \
	"nbdcopy -C 1 of the whole 2 GiB (read to null:, write from a second file);" \
	"each server's disk written once in full before the first job (preconditioning, untimed);" \
	"one client (libnbd) stays attached to each server through the run, as a VM would; servers alternate job by job, order rotated; before each job (untimed) an NBD FLUSH to every server and \`sync\`, and after a Goldilocks job a wait until the gateway has used no CPU for ${QUIET} s (its idle work); each figure is the median of ${REPS} run(s), and a run during which more than ${STEAL_MAX} % of CPU time was steal is measured again (at most ${STEAL_RETRIES} times); MB = 10^6 bytes"
echo "- sets: ${SETS}; transports: ${TRANSPORTS}; jobs: ${JOBS[*]}"
if ((ENCRYPTED)); then
	echo "- encrypted set: Goldilocks default volume (AES-256-GCM, local keystore) filled by volume import" \
		"from the base file; one QEMU LUKS image (qemu-img create -f luks: LUKS1, aes-256-xts-plain64," \
		"iter-time ${LUKS_ITER_MS} ms) filled by qemu-img convert from the base file, served by" \
		"qemu-nbd --image-opts driver=luks and by nbdkit file --filter=luks (writes of both go to it);" \
		"nbdcopy timings include the client's connection setup (shown under each table)"
fi
echo

# ---- data -------------------------------------------------------------------
BASE=$W/base.raw
SRC=$W/src.raw
D=$W/gl
D2=$W/gl-enc
LUKS=$W/disk.luks
PASSFILE=$W/luks.pass
log "temp dir $W; writing the 2 GiB base file (random data)"
head -c "$SIZE_BYTES" /dev/urandom >"$BASE"
cp "$BASE" "$SRC"
cat "$BASE" "$SRC" >/dev/null # page cache
if ((ENCRYPTED)); then
	# Before the plain set's writes land in $BASE (no matter, but tidy).
	mkdir -p "$D2"
	log "encrypted set: importing the base file into an encrypted Goldilocks volume"
	run_child "$W/prep.log" "$GOLDILOCKS" volume import disk --from "$BASE" --data-dir "$D2" ||
		{ tail -n 20 "$W/prep.log" >&2; die "volume import failed"; }
	log "encrypted set: creating and filling the LUKS image (iter-time $LUKS_ITER_MS ms)"
	printf '%s' "$LUKS_PASS" >"$PASSFILE"
	# qemu-img's PBKDF2 benchmark fails now and then on a fast CPU
	# ("Unable to get accurate CPU usage": its first round took under a
	# millisecond of thread time); it passes on a second try.
	for try in 1 2 3; do
		run_child "$W/prep.log" qemu-img create -f luks --object "secret,id=sec0,file=$PASSFILE" \
			-o "key-secret=sec0,iter-time=$LUKS_ITER_MS" "$LUKS" "$SIZE_BYTES" && break
		[ "$try" = 3 ] && { tail -n 20 "$W/prep.log" >&2; die "qemu-img create failed"; }
		log "qemu-img create failed (try $try); again"
	done
	run_child "$W/prep.log" qemu-img convert -n -f raw --object "secret,id=sec0,file=$PASSFILE" \
		--target-image-opts "$BASE" "$LUKS_OPTS,file.filename=$LUKS" ||
		{ tail -n 20 "$W/prep.log" >&2; die "qemu-img convert failed"; }
	# Page cache: what each server reads. The LUKS image is all payload;
	# a Goldilocks backing file is half unwritten second homes, which the
	# gateway never reads. A cat of it would fill the cache with large
	# folios over those holes, and a later 4 KiB write into such a folio
	# costs ext4 about 3x (perf: ext4_block_write_begin), so it is warmed
	# by reading the volume, as the gateway would.
	cat "$LUKS" >/dev/null
	"$GOLDILOCKS" volume export disk --to /dev/null --data-dir "$D2" ||
		die "warming the encrypted volume's cache failed"
fi
if [[ " $SETS " == *" plain "* ]]; then
	mkdir -p "$D"
	"$GOLDILOCKS" volume create disk --plain --backing "$BASE" --data-dir "$D" >&2
fi

RESULTS=$W/results.tsv
: >"$RESULTS"
: >"$CONNECT"
for set in $SETS; do
	if [[ $set == encrypted ]]; then
		SERVERS=("${SERVERS_encrypted[@]}")
	else
		SERVERS=("${SERVERS_plain[@]}")
	fi
	nserv=${#SERVERS[@]}
	for t in $TRANSPORTS; do
		log "$set, transport $t: starting servers"
		start_servers "$set" "$t"
		if [[ $t == "${TRANSPORTS%% *}" ]]; then
			precondition
		fi
		for ((r = 0; r < REPS; r++)); do
			for ((j = 0; j < ${#JOBS[@]}; j++)); do
				job=${JOBS[$j]}
				for ((k = 0; k < nserv; k++)); do
					s=${SERVERS[$(((k + r + j) % nserv))]}
					STEAL=0 # a failed run reports none
					if ! kill -0 "${PID[$s]}" 2>/dev/null; then
						log "$set $t rep $((r + 1))/$REPS $job $s: server is not running"
						tail -n 5 "$W/$s.log" >&2 || true
						v=fail
					elif rm -f "$VALUE" && settle && LAST=$s && measure_steady "$job" "${URI[$s]}" && read -r v <"$VALUE"; then
						:
					else
						log "$set $t rep $((r + 1))/$REPS $job $s: FAILED"
						tail -n 5 "$W/fio.log" "$W/nbdcopy.log" >&2 2>/dev/null || true
						v=fail
					fi
					[[ $v == fail ]] && FAILED=1
					log "$set $t rep $((r + 1))/$REPS $job $s: $v (steal $STEAL %)"
					printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$job" "$s" "$r" "$v" "$STEAL" >>"$RESULTS"
				done
			done
		done
		log "$set, transport $t: stopping servers"
		stop_servers
	done
done

# ---- report -----------------------------------------------------------------
"$PY" - "$RESULTS" "$CONNECT" "$SETS" "$TRANSPORTS" "${JOBS[*]}" "$STEAL_MAX" "$RETRIED" <<'EOF'
import statistics, sys
path, connect, sets, transports = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
wanted = sys.argv[5].split()
steal_max, retried = int(sys.argv[6]), int(sys.argv[7])
servers = {
    "plain": ["goldilocks", "qemu-nbd", "nbdkit"],
    "encrypted": ["goldilocks-enc", "qemu-nbd-luks", "nbdkit-luks"],
}
columns = {
    "plain": ["goldilocks", "qemu-nbd", "nbdkit"],
    "encrypted": ["goldilocks (encrypted)", "qemu-nbd + LUKS", "nbdkit + luks filter"],
}
jobs = [
    ("randread4k", "fio randread 4k qd32 (IOPS)"),
    ("randwrite4k", "fio randwrite 4k qd32 (IOPS)"),
    ("randwrite4ksync", "fio randwrite 4k qd1, flush after each (IOPS)"),
    ("read1m", "fio read 1M qd8 (MB/s)"),
    ("write1m", "fio write 1M qd8 (MB/s)"),
    ("copyread", "nbdcopy read (MB/s)"),
    ("copywrite", "nbdcopy write (MB/s)"),
]
jobs = [j for j in jobs if j[0] in wanted]
runs = {}
steal = {}
for line in open(path):
    t, job, s, r, v, st = line.rstrip("\n").split("\t")
    runs.setdefault((t, job, s), []).append(None if v == "fail" else float(v))
    steal.setdefault((t, job, s), []).append(int(st))
conn = {}
for line in open(connect):
    t, s, v = line.rstrip("\n").split("\t")
    conn[(t, s)] = float(v)

def med(key):
    vs = runs.get(key, [])
    if not vs or None in vs:
        return None
    return statistics.median(vs)

def fmt(v):
    return "fail" if v is None else "{:,.0f}".format(v)

for st in sets:
    for t in transports:
        where = "TCP loopback" if t == "tcp" else "Unix socket"
        print("## %s" % (where if st == "plain" else "Encrypted, " + where))
        print()
        print("| job | %s | goldilocks / best peer |" % " | ".join(columns[st]))
        print("|---|--:|--:|--:|--:|")
        for job, label in jobs:
            g, q, k = (med((t, job, s)) for s in servers[st])
            ratio = "n/a" if None in (g, q, k) else "%.2f" % (g / max(q, k))
            print("| %s | %s | %s | %s | %s |" % (label, fmt(g), fmt(q), fmt(k), ratio))
        print()
        if st == "encrypted":
            print("Connection setup (one `nbdinfo --size`, included in nbdcopy timings): %s" % ", ".join(
                "%s %s" % (c, "%.2f s" % conn[(t, s)] if (t, s) in conn else "n/a")
                for s, c in zip(servers[st], columns[st])))
            print()

allsteal = [x for v in steal.values() for x in v]
if allsteal:
    print("Steal (CPU time taken by the hypervisor) during the runs that count: median %d %%, highest %d %%; "
          "%d run(s) measured again for steal above %d %%." % (statistics.median(allsteal), max(allsteal), retried, steal_max))
    print()
print("<details><summary>all runs (steal % of each in brackets)</summary>")
print()
for st in sets:
    for t in transports:
        for job, label in jobs:
            cells = []
            for s in servers[st]:
                vs = runs.get((t, job, s), [])
                ss = steal.get((t, job, s), [])
                cells.append("%s %s" % (s, " ".join(("fail" if v is None else "%.0f" % v) + " [%d]" % x for v, x in zip(vs, ss))))
            print("- %s%s, %s: %s" % ("" if st == "plain" else "encrypted ", t, label, "; ".join(cells)))
print()
print("</details>")
EOF

if ((FAILED)); then
	log "some measurements failed (shown as 'fail')"
	exit 1
fi
log "done"
