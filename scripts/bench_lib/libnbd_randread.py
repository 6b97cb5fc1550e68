"""Random reads through libnbd's Python binding, for the rows fio cannot run: fio's nbd engine
does not allow URIs that name local files (tls-certificates=, tls-psk-file=). Keeps QD requests
in flight for SECONDS, each a BS-byte read at a random aligned offset; prints one JSON line.
The data is not looked at, so a buffer may be reused before an earlier read into it completed.

Usage: libnbd_randread.py URI SECONDS QD BS
"""
import json
import random
import sys
import time

import nbd

uri, seconds, qd, bs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
blocks = h.get_size() // bs
rng = random.Random(1)
bufs = [nbd.Buffer(bs) for _ in range(qd)]
done = 0
failed = []


def completed(err):
    global done
    if err.value != 0:
        failed.append(err.value)
    done += 1
    return 1


start = time.monotonic()
deadline = start + seconds
slot = 0
while time.monotonic() < deadline and not failed:
    while h.aio_in_flight() < qd:
        h.aio_pread(bufs[slot], rng.randrange(blocks) * bs, completion=completed)
        slot = (slot + 1) % qd
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
elapsed = time.monotonic() - start
h.shutdown()
if failed:
    sys.exit(f"libnbd_randread: {len(failed)} read(s) failed, first errno {failed[0]}")
print(json.dumps({"ios": done, "bytes": done * bs, "seconds": elapsed}))
