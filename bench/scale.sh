#!/usr/bin/env bash
# Scale of encrypted volumes (format 2), through the real binary:
#  1. `volume create` of a 1 TiB encrypted volume: wall time and the bytes
#     it wrote (blocks allocated to the sparse backing file);
#  2. the first attach (one `nbdinfo --size`, which opens the volume);
#  3. a random 4k read+write pass (fio randrw, ioengine=nbd, every block of
#     the first 4 GiB once) and the gateway's RSS after it;
#  4. N (default 1000) encrypted volumes of 64 GiB, each attached at once by
#     one client connection that writes 1 MiB into it and flushes, all
#     connections open together: the gateway's RSS then.
# Prints Markdown on stdout; progress on stderr.
#
#   GOLDILOCKS  binary (default: REPO/bin/goldilocks)
#   VOLUMES     count for step 4 (default 1000)
#   PASS_SIZE   size of the random pass of step 3 (default 4g)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
GOLDILOCKS=${GOLDILOCKS:-$REPO/bin/goldilocks}
VOLUMES=${VOLUMES:-1000}
PASS_SIZE=${PASS_SIZE:-4g}
PORT=${PORT:-10871}
log() { printf '[scale %s] %s\n' "$(date +%T)" "$*" >&2; }
for t in fio nbdinfo /usr/bin/python3; do command -v $t >/dev/null || { echo "scale.sh: $t is missing" >&2; exit 1; }; done
W=$(mktemp -d /tmp/goldilocks-scale.XXXXXX)
GW=""
cleanup() {
	[[ -n $GW ]] && kill "$GW" 2>/dev/null && wait "$GW" 2>/dev/null
	rm -rf "$W"
}
trap cleanup EXIT
rss() { awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM:/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
serve() { # data dir [serve flag...]
	local d=$1
	shift
	"$GOLDILOCKS" serve --data-dir "$d" --listen "127.0.0.1:$PORT" --unix none --metrics "" --log-level warn "$@" 2>"$W/serve.log" &
	GW=$!
	# Up to a minute: 1,000 volumes on a disk still busy with the files
	# of a run before took more than 10 s once.
	for _ in $(seq 600); do
		(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
		kill -0 "$GW" 2>/dev/null || break
		sleep 0.1
	done
	echo "gateway did not start: $(cat "$W/serve.log")" >&2
	exit 1
}
stop() { kill "$GW"; wait "$GW" 2>/dev/null || true; GW=""; }

echo "# Scale of encrypted volumes"
echo
echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(df -T /tmp | awk 'NR==2 {print $2}') on /tmp; $(date -u +%FT%TZ)"
echo "- binary: $("$GOLDILOCKS" --version 2>/dev/null | head -1)"
echo

D=$W/one
log "1. volume create big --size 1T"
t0=$(date +%s.%N)
"$GOLDILOCKS" --data-dir "$D" volume create big --size 1T >/dev/null 2>&1
t1=$(date +%s.%N)
img=$D/volumes/big.img
alloc=$(du -B1 "$img" | cut -f1)
echo "| step | result |"
echo "|---|--:|"
echo "| create 1 TiB encrypted volume: wall time | $(printf '%.3f' "$(echo "$t1 - $t0" | bc)") s |"
echo "| create: bytes allocated in the backing file (\`du -B1\`) | $alloc |"
echo "| create: backing file apparent size | $(stat -c %s "$img") |"

serve "$D"
t0=$(date +%s.%N)
nbdinfo --size "nbd://127.0.0.1:$PORT/big" >/dev/null
t1=$(date +%s.%N)
echo "| first attach (\`nbdinfo --size\`, opens the volume) | $(printf '%.3f' "$(echo "$t1 - $t0" | bc)") s |"
echo "| gateway RSS after the attach | $(rss $GW) MiB |"

log "3. fio randrw 4k over $PASS_SIZE"
fio --name=pass --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/big" --rw=randrw --bs=4k --size="$PASS_SIZE" \
	--iodepth=16 --numjobs=1 --output-format=terse >"$W/fio.txt" 2>&1 || { cat "$W/fio.txt" >&2; exit 1; }
echo "| after a random 4k read+write pass over $PASS_SIZE (fio randrw, qd16): gateway RSS | $(rss $GW) MiB (peak $(hwm $GW) MiB) |"
stop
t0=$(date +%s.%N)
serve "$D"
nbdinfo --size "nbd://127.0.0.1:$PORT/big" >/dev/null
t1=$(date +%s.%N)
echo "| reattach after that pass (gateway start + \`nbdinfo --size\`) | $(printf '%.3f' "$(echo "$t1 - $t0" | bc)") s |"
echo "| backing file allocated after the pass | $(du -B1 "$img" | cut -f1) |"
stop

D=$W/many
log "4. $VOLUMES volumes of 64 GiB"
for i in $(seq "$VOLUMES"); do
	"$GOLDILOCKS" --data-dir "$D" volume create "v$i" --size 64G >/dev/null 2>&1
done
ulimit -n $((VOLUMES * 2 + 256))
# One client attaches them all at once: past the default attach rate (50
# a second per peer), which guards a host, not what this measures.
serve "$D" --attach-rate -1
log "attaching $VOLUMES volumes at once"
/usr/bin/python3 - "$PORT" "$VOLUMES" "$GW" "$W/rss.txt" <<'EOF'
import nbd, sys, os, time
port, n, gw, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rss():
    st = open(f"/proc/{gw}/status").read()
    return int([l for l in st.splitlines() if l.startswith("VmRSS:")][0].split()[1]) / 1024
hs, attach = [], []
buf = os.urandom(1 << 20)
before = rss()
for i in range(1, n + 1):
    h = nbd.NBD()
    t0 = time.monotonic()
    h.connect_uri(f"nbd://127.0.0.1:{port}/v{i}")  # the handshake opens the volume
    attach.append(time.monotonic() - t0)
    h.pwrite(buf, (i * 7919 % 1000) << 20)
    h.flush()
    hs.append(h)
after = rss()
attach.sort()
with open(out, "w") as f:
    f.write(f"{after:.1f}\n{before:.1f}\n{(after - before) * 1024 / n:.0f}\n")
    f.write(f"{attach[len(attach) // 2] * 1000:.1f}\n{attach[len(attach) * 99 // 100] * 1000:.1f}\n")
for h in hs:
    h.shutdown()
EOF
{ read -r after; read -r before; read -r per; read -r p50; read -r p99; } <"$W/rss.txt"
echo "| $VOLUMES encrypted 64 GiB volumes attached at once, 1 MiB written and flushed in each: gateway RSS | $after MiB (before the attaches: $before MiB) |"
echo "| the same: memory per attached volume (RSS growth / $VOLUMES) | $per KiB |"
echo "| the same: attach time of one volume (connect and open, the others attached), median / p99 | $p50 / $p99 ms |"
stop
