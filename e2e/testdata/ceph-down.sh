#!/bin/bash
# ceph-down.sh - stop everything ceph-up.sh started (after ../shared/ceph/ceph-down.sh), by PID (pid files in $D/run), then remove state.
# KEEP=1 keeps $D (logs, OSD file) for inspection.
BASE=${BASE:-/tmp/ceph-study}
D=$BASE/cluster
[ -d "$D/run" ] || { echo "nothing to stop ($D/run missing)"; exit 0; }

declare -A COMM=([qemu-nbd]=qemu-nbd [nbdkit]=nbdkit [mgr.x]=ceph-mgr [osd.0]=ceph-osd [mon.a]=ceph-mon)
stop() {  # args: names of pid files in $D/run; SIGTERM all, wait up to 20 s, then SIGKILL
  local n pid pids=()
  for n in "$@"; do
    [ -f "$D/run/$n.pid" ] || continue
    pid=$(cat "$D/run/$n.pid")
    # guard against a recycled pid: must be our binary and must carry our config path
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
       grep -qx "${COMM[$n]}" "/proc/$pid/comm" &&
       cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' | grep -q "$BASE/ceph.conf"; then
      kill -TERM "$pid"; pids+=("$pid"); echo "SIGTERM $n (pid $pid)"
    fi
    rm -f "$D/run/$n.pid"
  done
  for _ in $(seq 200); do
    local alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0; sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && { echo "SIGKILL $pid"; kill -KILL "$pid"; }; done
  return 0
}
stop qemu-nbd nbdkit        # NBD servers (RBD clients) first, so they release their RBD watch/lock
stop mgr.x osd.0            # then mgr + OSD (the OSD tells the still-running mon it is going down;
stop mon.a                  #  with the mon already gone it would wait osd_mon_shutdown_timeout=5 s)
if [ "${KEEP:-0}" != 1 ]; then rm -rf "$D" "$BASE/ceph.conf"; echo "removed $D"; fi
