#!/usr/bin/python3
"""sparse-reads.py URI STRUCTURED QD SECONDS: 4 KiB random reads through
libnbd with QD in flight for SECONDS, asking the server for structured
replies (STRUCTURED 1) or not (0); prints the IOPS. Used by rbd-probe.sh:
a server that sends sparse reads asks its storage for the block status of
every read."""
import random
import sys
import time

import nbd

uri, structured, qd, seconds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
blocks = h.get_size() // 4096
done = inflight = 0


def completed(err):
    global done, inflight
    done += 1
    inflight -= 1
    return 1


t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    while inflight < qd:
        h.aio_pread(nbd.Buffer(4096), random.randrange(blocks) * 4096, completed)
        inflight += 1
    h.poll(-1)
while inflight:
    h.poll(-1)
print("structured replies %s (negotiated %s): %.0f IOPS" % (
    "asked" if structured else "not asked", h.get_structured_replies_negotiated(), done / (time.monotonic() - t0)))
