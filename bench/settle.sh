# Sourced by run.sh and storage.sh: what a benchmark does beside and
# between its jobs. Needs PY (a python3 with Debian's python3-libnbd).

# hold URI LOG: start a libnbd client that stays attached to URI until
# killed, as a running VM stays attached to its disk (a Goldilocks volume
# is open only while a client is attached). Its pid goes to HOLD_PID.
hold() {
	"$PY" -c 'import nbd, sys, time; h = nbd.NBD(); h.connect_uri(sys.argv[1]); time.sleep(1e9)' \
		"$1" >>"$2" 2>&1 &
	HOLD_PID=$!
}

# nbd_flush URI LOG: one NBD FLUSH through a connection of its own.
nbd_flush() {
	"$PY" -c 'import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()' \
		"$1" >>"$2" 2>&1
}

# cpu_ticks PID: user + system CPU time of a process, in clock ticks.
cpu_ticks() {
	awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# wait_quiet PID SECONDS: wait (at most 120 s) until the process has used
# no CPU for SECONDS: a Goldilocks gateway's idle work (a checkpoint 5 s
# after the last commit, home alignment 2 s after the last request) then
# runs before the next job instead of inside it.
wait_quiet() {
	local pid=$1 want=$(($2 * 2)) quiet=0 deadline=$((SECONDS + 120)) a b
	a=$(cpu_ticks "$pid")
	while ((quiet < want && SECONDS < deadline)); do
		sleep 0.5
		b=$(cpu_ticks "$pid")
		if ((b - a <= 1)); then quiet=$((quiet + 1)); else quiet=0; fi
		a=$b
	done
}
