"""Multi-connection coherence through several libnbd handles with commands in flight at once.

Usage: _coherence.py URI MODEL_PATH CONFIG_JSON

CONFIG_JSON: {"conns": N, "seed": S, "rounds": R, "raceRounds": Q, "seconds": T,
              "cluster": C, "raceFrom": OFFSET}

The script keeps a model of the export's bytes (read whole at the start) and checks every read
against it.

Coherence rounds (offsets below raceFrom): several chains at once, each on distinct connections
A, B, C: A writes (one to three pieces, random offsets and lengths, aio), then B flushes, then C
reads A's ranges. While the writes are in flight, other connections read ranges no chain
touches. So writes on A, FLUSH on B and reads on C must agree, whichever threads they land on.

Race rounds (offsets from raceFrom, never written before, so for qcow2 every cluster is still
unallocated): all connections write at once either into neighbouring fresh clusters (one cluster
each, whole or a piece) or into pieces of one fresh cluster (sub-cluster allocation races); a few
pieces are write-zeroes instead. Then one connection flushes and every connection reads the
whole group back.

At the end every connection reads the whole export, and the model is written to MODEL_PATH for
`qemu-img compare`. The last stdout line is a JSON summary; mismatches are reported there, not
raised, so the caller's assertion shows them.
"""

import json
import random
import select
import sys
import time

import nbd


def main():
    uri, model_path, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    n = config["conns"]
    rng = random.Random(config["seed"])
    deadline = time.monotonic() + config["seconds"]
    cluster = config["cluster"]
    race_from = config["raceFrom"]

    hs = []
    for i in range(n):
        h = nbd.NBD()
        h.set_handle_name("c%d" % i)
        h.connect_uri(uri)
        hs.append(h)
    size = hs[0].get_size()
    out = {
        "multiConn": [h.can_multi_conn() for h in hs],
        "size": size,
        "rounds": 0,
        "raceRounds": 0,
        "writes": 0,
        "reads": 0,
        "flushes": 0,
        "zeroes": 0,
        "maxInFlight": 0,
        "mismatches": [],
    }

    def wait_all(cmds):
        """cmds: list of (handle index, cookie). Pumps every handle until all completed."""
        left = list(cmds)
        inflight = sum(h.aio_in_flight() for h in hs)
        out["maxInFlight"] = max(out["maxInFlight"], inflight)
        while left:
            if time.monotonic() > deadline + 30:
                raise RuntimeError("commands still in flight 30 s past the deadline")
            # aio_command_completed raises nbd.Error for a command that failed.
            left = [(i, c) for (i, c) in left if not hs[i].aio_command_completed(c)]
            if not left:
                break
            rl, wl, owner = [], [], {}
            for i, h in enumerate(hs):
                fd = h.aio_get_fd()
                d = h.aio_get_direction()
                owner[fd] = h
                if d & nbd.AIO_DIRECTION_READ:
                    rl.append(fd)
                if d & nbd.AIO_DIRECTION_WRITE:
                    wl.append(fd)
            r, w, _ = select.select(rl, wl, [], 1.0)
            for fd in w:
                owner[fd].aio_notify_write()
            for fd in r:
                owner[fd].aio_notify_read()
        keep.clear()

    keep = []  # write buffers must outlive their commands

    def wbuf(data):
        b = nbd.Buffer.from_bytearray(bytearray(data))
        keep.append(b)
        return b

    def check(where, off, got):
        want = bytes(model[off:off + len(got)])
        if got != want and len(out["mismatches"]) < 10:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            out["mismatches"].append({
                "where": where, "offset": off, "length": len(got),
                "firstDiff": off + first,
                "got": got[first:first + 8].hex(), "want": want[first:first + 8].hex(),
            })

    def read_many(reqs, where):
        """reqs: list of (handle index, offset, length), all sent at once, then checked."""
        bufs, cmds = [], []
        for (i, off, ln) in reqs:
            b = nbd.Buffer(ln)
            cmds.append((i, hs[i].aio_pread(b, off)))
            bufs.append((i, off, b))
        out["reads"] += len(reqs)
        return cmds, lambda: [check("%s c%d" % (where, i), off, b.to_bytearray())
                              for (i, off, b) in bufs]

    # The model starts as the export's content.
    model = bytearray()
    step = 4 << 20
    for off in range(0, size, step):
        model += hs[0].pread(min(step, size - off), off)

    def rand_len(limit):
        k = rng.random()
        if k < 0.3:
            ln = rng.randint(1, 4096)
        elif k < 0.7:
            ln = rng.randint(1, 128) * 512
        elif k < 0.95:
            ln = rng.randint(64 << 10, 1 << 20)
        else:
            ln = rng.randint(1 << 20, 4 << 20)
        return max(1, min(ln, limit))

    def overlaps(a, b):
        return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]

    # ---- coherence rounds
    while out["rounds"] < config["rounds"] and time.monotonic() < deadline:
        chains = []
        taken = []
        for _ in range(rng.randint(1, max(1, n // 2))):
            a, b, c = rng.sample(range(n), 3)
            pieces = []
            for _ in range(rng.randint(1, 3)):
                for _try in range(20):
                    ln = rand_len(race_from)
                    off = rng.randint(0, race_from - ln)
                    if not any(overlaps((off, ln), t) for t in taken):
                        taken.append((off, ln))
                        pieces.append((off, ln))
                        break
            if pieces:
                chains.append((a, b, c, pieces))
        # Reads elsewhere while the writes fly, checked against the model before this round.
        side = []
        for _ in range(rng.randint(0, n)):
            ln = rand_len(race_from)
            off = rng.randint(0, race_from - ln)
            if not any(overlaps((off, ln), t) for t in taken):
                side.append((rng.randrange(n), off, ln))
        cmds = []
        for (a, _b, _c, pieces) in chains:
            for (off, ln) in pieces:
                data = rng.randbytes(ln)
                model[off:off + ln] = data
                cmds.append((a, hs[a].aio_pwrite(wbuf(data), off)))
                out["writes"] += 1
        side_cmds, side_check = read_many(side, "side read")
        wait_all(cmds + side_cmds)
        side_check()
        cmds = []
        for (_a, b, _c, _p) in chains:
            cmds.append((b, hs[b].aio_flush()))
            out["flushes"] += 1
        wait_all(cmds)
        reqs = [(c, off, ln) for (_a, _b, c, pieces) in chains for (off, ln) in pieces]
        cmds, checker = read_many(reqs, "round %d read" % out["rounds"])
        wait_all(cmds)
        checker()
        out["rounds"] += 1

    # ---- allocation races in fresh clusters
    next_cluster = race_from // cluster
    last_cluster = size // cluster
    while out["raceRounds"] < config["raceRounds"] and time.monotonic() < deadline:
        neighbours = rng.random() < 0.5
        need = n if neighbours else 1
        if next_cluster + need > last_cluster:
            break
        base = next_cluster * cluster
        next_cluster += need
        pieces = []
        if neighbours:
            for i in range(n):
                start = base + i * cluster
                if rng.random() < 0.5:
                    pieces.append((i, start, cluster))
                else:
                    lo = rng.randrange(cluster)
                    hi = rng.randint(lo + 1, cluster)
                    pieces.append((i, start + lo, hi - lo))
        else:
            cuts = sorted(rng.sample(range(1, cluster), n - 1))
            if rng.random() < 0.5:
                cuts = sorted({(c // 512) * 512 for c in cuts} - {0})
            bounds = [0] + cuts + [cluster]
            for i in range(len(bounds) - 1):
                pieces.append((i % n, base + bounds[i], bounds[i + 1] - bounds[i]))
        cmds = []
        for (i, off, ln) in pieces:
            if rng.random() < 0.15:
                model[off:off + ln] = bytes(ln)
                cmds.append((i, hs[i].aio_zero(ln, off)))
                out["zeroes"] += 1
            else:
                data = rng.randbytes(ln)
                model[off:off + ln] = data
                cmds.append((i, hs[i].aio_pwrite(wbuf(data), off)))
                out["writes"] += 1
        wait_all(cmds)
        f = rng.randrange(n)
        wait_all([(f, hs[f].aio_flush())])
        out["flushes"] += 1
        span = need * cluster
        cmds, checker = read_many([(i, base, span) for i in range(n)],
                                  "race %d read" % out["raceRounds"])
        wait_all(cmds)
        checker()
        out["raceRounds"] += 1

    # ---- every connection reads everything back
    wait_all([(i, h.aio_flush()) for i, h in enumerate(hs)])
    chunk = 1 << 20
    for off in range(0, size, chunk * 4):
        reqs = []
        for i in range(n):
            for k in range(4):
                o = off + k * chunk
                if o < size:
                    reqs.append((i, o, min(chunk, size - o)))
        cmds, checker = read_many(reqs, "final read")
        wait_all(cmds)
        checker()

    for h in hs:
        h.shutdown()
    with open(model_path, "wb") as f:
        f.write(model)
    print(json.dumps(out))


main()
