#!/bin/bash
# ceph-up.sh - throwaway single-node Ceph 16.2 (Debian 12 packages) for e2e/ceph_test.go:
# 1 mon, 1 BlueStore OSD whose "block device" is a sparse plain file, optional mgr, pool
# "rbd" (size 1), one RBD image. No kernel modules, no loop devices, no systemd, nothing
# written outside $BASE. After ../shared/ceph/ceph-up.sh (the team's reference).
# Needs: ceph-mon ceph-osd ceph-common [ceph-mgr].
set -euo pipefail

BASE=${BASE:-/tmp/ceph-study}
D=$BASE/cluster                       # all state, logs, sockets, pid files
CONF=$BASE/ceph.conf
IP=127.0.0.1
MON_V2=${MON_V2:-43300}               # non-default ports so nothing else on the box clashes
MON_V1=${MON_V1:-46789}
OSD_PORT_MIN=${OSD_PORT_MIN:-46800}
OSD_PORT_MAX=${OSD_PORT_MAX:-46899}
OSD_SIZE=${OSD_SIZE:-4294967296}     # bytes, sparse file
OSD_MEM=${OSD_MEM:-1073741824}        # osd_memory_target (default would be 4 GiB)
POOL=${POOL:-rbd}
IMG=${IMG:-img}
IMG_SIZE=${IMG_SIZE:-1G}
WITH_MGR=${WITH_MGR:-0}               # 0 = no mgr (I/O still works, 'ceph -s' shows no PG stats)
EXTRA_OSD_CONF=${EXTRA_OSD_CONF:-}    # extra "key = value" lines for the [osd] section

t0=$(date +%s.%N)
step() { printf '[%6.2fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }
fail() { echo "FAILED: $*" >&2; tail -n 20 "$D"/log/*.log >&2 2>/dev/null || true; exit 1; }

[ -e "$D" ] && fail "$D exists - run ceph-down.sh first"
for p in $MON_V2 $MON_V1; do
  [ "$p" = 0 ] || ! ss -Hltn "sport = :$p" | grep -q . || fail "port $p already in use"
done
mkdir -p "$D"/{mon.a,osd.0,mgr.x,run,log,crash}
FSID=$(cat /proc/sys/kernel/random/uuid)

cat > "$CONF" <<EOF
[global]
fsid = $FSID
mon host = [v2:$IP:$MON_V2,v1:$IP:$MON_V1]
public addr = $IP
cluster addr = $IP
ms bind port min = $OSD_PORT_MIN
ms bind port max = $OSD_PORT_MAX
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $D/run
crash dir = $D/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
client mount timeout = 60
auth allow insecure global id reclaim = false
mon data avail warn = 5
[client]
keyring = $D/keyring
log file = $D/log/client.log
admin socket = $D/run/\$name.\$pid.\$cctid.asok
[mon]
mon data = $D/mon.\$id
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
mon cluster log file = $D/log/cluster.log
[mgr]
mgr data = $D/mgr.\$id
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
[osd]
osd data = $D/osd.\$id
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_SIZE
osd memory target = $OSD_MEM
$EXTRA_OSD_CONF
EOF
export CEPH_CONF=$CONF
step "config written ($CONF)"

# --- monitor -------------------------------------------------------------------------------
ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$D/keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --clobber --fsid "$FSID" --addv a "[v2:$IP:$MON_V2,v1:$IP:$MON_V1]" \
  "$D/monmap" >/dev/null
ceph-mon -i a --mkfs --monmap "$D/monmap" --keyring "$D/keyring"
ceph-mon -i a                                  # daemonizes, writes $D/run/mon.a.pid
timeout 60 ceph mon stat >/dev/null || fail "mon not answering"
step "mon up (pid $(cat "$D/run/mon.a.pid"))"

# the pool can exist before any OSD does; its PGs are created once osd.0 boots
ceph osd pool create "$POOL" 8 8 replicated >/dev/null 2>&1 || fail "pool create"
step "pool $POOL created (size 1 from 'osd pool default size')"

# --- manager (optional, started in background of the bring-up) ------------------------------
if [ "$WITH_MGR" = 1 ]; then
  ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$D/mgr.x/keyring"
  ceph-mgr -i x
  step "mgr started"
fi

# --- OSD: BlueStore on a sparse file $D/osd.0/block ----------------------------------------
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_KEY=$(ceph-authtool --gen-print-key)
printf '{"cephx_secret": "%s"}' "$OSD_KEY" > "$D/osd.0/new.json"
OSD_ID=$(ceph osd new "$OSD_UUID" -i "$D/osd.0/new.json")
rm -f "$D/osd.0/new.json"
[ "$OSD_ID" = 0 ] || fail "unexpected osd id $OSD_ID"
printf '[osd.0]\n\tkey = %s\n' "$OSD_KEY" > "$D/osd.0/keyring"
ceph-osd -i 0 --mkfs --key "$OSD_KEY" --osd-uuid "$OSD_UUID" > "$D/log/osd.0.mkfs.log" 2>&1 \
  || fail "osd mkfs"
step "osd mkfs done"
ceph-osd -i 0 2>>"$D/log/osd.0.stderr"         # daemonizes, writes $D/run/osd.0.pid
step "osd started (pid $(cat "$D/run/osd.0.pid"))"

up=0
for _ in $(seq 120); do
  [ "$(ceph osd stat -f json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])')" = 1 ] \
    && { up=1; break; }
  sleep 0.5
done
[ $up = 1 ] || fail "osd.0 did not come up within 60 s"
step "osd.0 up"

timeout 120 rbd pool init "$POOL" || fail "rbd pool init"
timeout 120 rbd create "$POOL/$IMG" --size "$IMG_SIZE" || fail "rbd create"
step "rbd image $POOL/$IMG ($IMG_SIZE) created - cluster usable"

