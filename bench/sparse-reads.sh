#!/bin/bash
# sparse-reads.sh [BINARY]: nbdcopy of a mostly empty 4 GiB volume
# (encrypted and plain, 64 MiB of data at the start) to null:, with and
# without block status (bench/sparse-reads.md).
set -euo pipefail
B=${1:-bin/goldilocks}
DIR=$(mktemp -d /tmp/gl-sparse.XXXXXX)
trap 'kill -INT $P 2>/dev/null; wait; rm -rf "$DIR"' EXIT
"$B" --data-dir "$DIR" volume create enc --size 4G >/dev/null 2>&1
truncate -s 4G "$DIR/plain.raw"
"$B" --data-dir "$DIR" volume create pl --plain --backing "$DIR/plain.raw" >/dev/null 2>&1
head -c 64M /dev/urandom >"$DIR/d64"
"$B" --data-dir "$DIR" serve --listen 127.0.0.1:10997 --unix none --metrics "" --log-level warn >"$DIR/serve.log" 2>&1 &
P=$!
sleep 1
for v in enc pl; do
	nbdcopy "$DIR/d64" "nbd://127.0.0.1:10997/$v"
	for mode in --no-extents ""; do
		for i in 1 2; do
			t0=$(date +%s.%N)
			nbdcopy $mode "nbd://127.0.0.1:10997/$v" null:
			t1=$(date +%s.%N)
			echo "$v nbdcopy ${mode:-(block status)} $(echo "$t1 - $t0" | bc) s"
		done
	done
done
