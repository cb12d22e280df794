#!/usr/bin/env bash
# What the RBD cells of storage.sh measure (bench/README.md, "What the RBD
# cells measure"). On a single-node Ceph cluster (e2e/testdata/ceph-up.sh)
# with one image per server, as storage.sh sets them up:
#
#   1. qemu-nbd's plain path (-f raw rbd:…) against its LUKS path, each on
#      an image of its own written in full, fio 4k random reads at queue
#      depths 1, 8 and 32;
#   2. the same two with a libnbd client that asks for structured replies
#      and one that does not (bench/sparse-reads.py);
#   3. Goldilocks (encrypted) against qemu-nbd + LUKS, 4k random reads,
#      alternating: IOPS, and per request the server's CPU time, the
#      OSD's and the server's context switches (/proc).
#
# Knobs: RUNTIME (s per fio run, default 6), REPS (default 3),
#        GOLDILOCKS (binary, default REPO/bin/goldilocks, built with Ceph),
#        PARTS (which of the parts to run, default "1 2 3"),
#        GOLDILOCKS_B (a second binary, on an image of its own, that part 3
#        alternates with the first: an A/B of two builds on one cluster).
# Output: lines on stdout, progress on stderr.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
RUNTIME=${RUNTIME:-6}
REPS=${REPS:-3}
PARTS=${PARTS:-1 2 3}
GOLDILOCKS_B=${GOLDILOCKS_B:-}
PY=/usr/bin/python3
# shellcheck source=bench/settle.sh
. "$REPO/bench/settle.sh"

log() { printf '[rbd-probe %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in qemu-nbd qemu-img fio nbdcopy rbd ceph-mon; do
	command -v "$c" >/dev/null || die "$c not found (make deps)"
done
[[ -x $GOLDILOCKS ]] || die "$GOLDILOCKS not found (make build)"
[[ -z $GOLDILOCKS_B || -x $GOLDILOCKS_B ]] || die "GOLDILOCKS_B: $GOLDILOCKS_B not found"
has() { [[ " $PARTS " == *" $1 "* ]]; }

W=$(mktemp -d /tmp/goldilocks-rbd-probe.XXXXXX)
declare -A PID=()
CEPH_UP=0
cleanup() {
	local rc=$? n
	set +e
	for n in "${!PID[@]}"; do kill "${PID[$n]}" 2>/dev/null; wait "${PID[$n]}" 2>/dev/null; done
	((CEPH_UP)) && BASE=$W/ceph bash "$REPO/e2e/testdata/ceph-down.sh" >/dev/null 2>&1
	rm -rf "$W"
	exit "$rc"
}
trap cleanup EXIT
start() { # name socket command...
	local name=$1 sock=$2 i
	shift 2
	"$@" >"$W/$name.log" 2>&1 &
	PID[$name]=$!
	for ((i = 0; i < 200; i++)); do
		[[ -S $sock ]] && return 0
		sleep 0.05
	done
	die "$name: no socket at $sock"
}

log "bringing up a single-node Ceph cluster in $W"
BASE=$W/ceph IMG=gl-enc IMG_SIZE=2200M OSD_SIZE=12884901888 bash "$REPO/e2e/testdata/ceph-up.sh" >"$W/ceph-up.log" 2>&1 ||
	{ cat "$W/ceph-up.log" >&2; die "ceph-up failed"; }
CEPH_UP=1
export CEPH_CONF=$W/ceph/ceph.conf
printf 'bench-pass' >"$W/luks.pass"
for try in 1 2 3; do # qemu-img cannot always time its PBKDF: retry
	qemu-img create -f luks --object secret,id=s0,file="$W/luks.pass" -o key-secret=s0,iter-time=10 \
		"rbd:rbd/luks:conf=$CEPH_CONF" 1G >/dev/null && break
	((try < 3)) || die "qemu-img create of the LUKS image failed"
	rbd rm rbd/luks >/dev/null 2>&1 || true
done
D=$W/gl
"$GOLDILOCKS" --data-dir "$D" volume create enc --size 1G --backing rbd:rbd/gl-enc --ceph-conf "$CEPH_CONF" >&2
start gl "$D/nbd.sock" "$GOLDILOCKS" serve --data-dir "$D" --listen "" --metrics "" --log-level warn
start luks "$W/luks.sock" qemu-nbd -t -e 4 -k "$W/luks.sock" -x disk --cache=none \
	--object "secret,id=s0,file=$W/luks.pass" --image-opts "driver=luks,key-secret=s0,file.driver=rbd,file.pool=rbd,file.image=luks,file.conf=$CEPH_CONF"
rbd create rbd/plain --size 1G
start raw "$W/raw.sock" qemu-nbd -t -e 4 -f raw --cache=none -k "$W/raw.sock" -x disk "rbd:rbd/plain:conf=$CEPH_CONF"
GL="nbd+unix:///enc?socket=$D/nbd.sock"
SERVERS="gl luks"
if [[ -n $GOLDILOCKS_B ]]; then
	rbd create rbd/gl-enc-b --size 2200M
	"$GOLDILOCKS_B" --data-dir "$W/glb" volume create enc --size 1G --backing rbd:rbd/gl-enc-b --ceph-conf "$CEPH_CONF" >&2
	start glb "$W/glb/nbd.sock" "$GOLDILOCKS_B" serve --data-dir "$W/glb" --listen "" --metrics "" --log-level warn
	GLB="nbd+unix:///enc?socket=$W/glb/nbd.sock"
	SERVERS="gl glb luks"
fi
LUKS="nbd+unix:///disk?socket=$W/luks.sock"
RAW="nbd+unix:///disk?socket=$W/raw.sock"
head -c 1073741824 /dev/urandom >"$W/src.raw"
WRITE=("$GL" ${GLB:+"$GLB"} "$LUKS")
{ has 1 || has 2; } && WRITE+=("$RAW")
for u in "${WRITE[@]}"; do
	log "writing 1 GiB to $u"
	nbdcopy -C 1 "$W/src.raw" "$u" || die "nbdcopy to $u"
done
rm -f "$W/src.raw"

# fio4k URI QD: prints "IOPS mean-completion-µs total-requests".
fio4k() {
	fio --name=t --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth="$2" --numjobs=1 \
		--runtime="$RUNTIME" --time_based --output-format=json --output="$W/fio.json" >/dev/null 2>&1 || die "fio on $1"
	"$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))["jobs"][0]["read"]; print("%.0f %.0f %d" % (r["iops"], r["clat_ns"]["mean"] / 1000, r["total_ios"]))' "$W/fio.json"
}

has 1 && {
echo "## 1. qemu-nbd -f raw rbd:rbd/plain against driver=luks,file.driver=rbd (rbd/luks) (fio 4k randread, ${RUNTIME} s)"
for qd in 1 8 32; do
	for s in raw luks; do
		u=$RAW
		[[ $s == luks ]] && u=$LUKS
		read -r iops lat _ < <(fio4k "$u" "$qd")
		echo "qd $qd, qemu-nbd $s: $iops IOPS, mean completion $lat µs"
	done
done

}

has 2 && {
echo "## 2. libnbd client, 8 reads in flight, with and without structured replies"
for s in raw luks; do
	u=$RAW
	[[ $s == luks ]] && u=$LUKS
	for sr in 1 0 1 0; do
		echo "qemu-nbd $s: $("$PY" "$REPO/bench/sparse-reads.py" "$u" "$sr" 8 4)"
	done
done

}

has 3 || exit 0
echo "## 3. goldilocks (encrypted) against qemu-nbd + LUKS, 4k randread qd32, a client attached throughout"
OSD=$(cat "$W/ceph/cluster/run/osd.0.pid")
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s }'; }
hold "$GL" "$W/hold.log"
PID[hold-gl]=$HOLD_PID
hold "$LUKS" "$W/hold.log"
PID[hold-luks]=$HOLD_PID
fio4k "$GL" 32 >/dev/null # the gateway's map cache, warm as a running VM's
if [[ -n $GOLDILOCKS_B ]]; then
	hold "$GLB" "$W/hold.log"
	PID[hold-glb]=$HOLD_PID
	fio4k "$GLB" 32 >/dev/null
fi
for ((r = 1; r <= REPS; r++)); do
	for s in $SERVERS; do
		case $s in
		gl) u=$GL ;;
		glb) u=$GLB ;;
		luks) u=$LUKS ;;
		esac
		p=${PID[$s]}
		c0=$(cpu_ticks "$p") o0=$(cpu_ticks "$OSD") x0=$(switches "$p")
		read -r iops _ n < <(fio4k "$u" 32)
		c1=$(cpu_ticks "$p") o1=$(cpu_ticks "$OSD") x1=$(switches "$p")
		tick=$(getconf CLK_TCK)
		"$PY" -c 'import sys; s, r, iops, n, c, o, x, hz = sys.argv[1:]; n = int(n); print("rep %s %-5s %s IOPS; per request: server CPU %.0f µs, OSD CPU %.0f µs, server context switches %.2f" % (r, s, iops, int(c) * 1e6 / int(hz) / n, int(o) * 1e6 / int(hz) / n, int(x) / n))' \
			"$s" "$r" "$iops" "$n" $((c1 - c0)) $((o1 - o0)) $((x1 - x0)) "$tick"
	done
done
