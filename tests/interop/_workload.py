"""Replays a generated write workload against an NBD server with several libnbd connections.

Usage: _workload.py URI WORKLOAD_JSON PATTERN_DIR LOG_PATH [--hash] [--deadline SECONDS]

The workload (written by _qcow2_write_helpers.ts) is a list of ops and a list of batches. All ops
of one batch are sent at once, spread over the connections, and the next batch starts only when
every op of the batch has completed. Ops of one batch never overlap in bytes, so the final image
content does not depend on the order the server runs them in.

Write data is the op's pattern file (PATTERN_DIR/<op index>.bin) repeated to the op's length, the
same bytes `qemu-io write -s FILE` writes.

LOG_PATH gets one line per event, written as it happens (line buffered, so it survives the server
or this process being killed):
  C <multi_conn 0|1>   all connections are up
  B <batch>            the batch's ops are about to be sent
  A <op>               the op completed successfully (for a flush: on every connection used)
  E <op> <errno>       the op failed
  X <reason>           the run stopped early (connection lost, deadline)
  D                    every batch completed

The last stdout line is a JSON summary. The exit code is 0 whenever the script ran to its end, even
if ops failed (a crash test expects failures once the server is killed); the caller judges.
"""

import hashlib
import json
import os
import select
import sys
import time

import nbd


def main():
    args = sys.argv[1:]
    want_hash = "--hash" in args
    deadline_s = 60.0
    if "--deadline" in args:
        deadline_s = float(args[args.index("--deadline") + 1])
    uri, workload_path, pat_dir, log_path = args[:4]
    deadline = time.monotonic() + deadline_s

    with open(workload_path) as f:
        w = json.load(f)
    ops = w["ops"]
    batches = w["batches"]

    log = open(log_path, "w", buffering=1)

    handles = []
    for _ in range(w["connections"]):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    multi = all(h.can_multi_conn() for h in handles)
    log.write("C %d\n" % (1 if multi else 0))

    dead = set()  # indices of handles whose connection failed
    pending = {}  # op index -> number of outstanding commands
    failed = {}  # op index -> errno
    keep = []  # buffers must outlive their commands
    stats = {"acked": 0, "errors": 0, "flushes": 0, "batches": 0}

    def completion(oi):
        def cb(err):
            e = err.value
            if e != 0 and oi not in failed:
                failed[oi] = e
            pending[oi] -= 1
            if pending[oi] == 0:
                del pending[oi]
                if oi in failed:
                    stats["errors"] += 1
                    log.write("E %d %d\n" % (oi, failed[oi]))
                else:
                    stats["acked"] += 1
                    log.write("A %d\n" % oi)
            return 1

        return cb

    def pattern_data(oi, length):
        with open(os.path.join(pat_dir, "%d.bin" % oi), "rb") as f:
            pat = f.read()
        reps = length // len(pat) + 1
        return bytearray((pat * reps)[:length])

    def submit(oi):
        op = ops[oi]
        kind = op["kind"]
        flags = nbd.CMD_FLAG_FUA if op.get("fua") else 0
        if kind == "flush":
            targets = [op["conn"]] if multi else list(range(len(handles)))
        else:
            targets = [op["conn"]]
        targets = [t for t in targets if t not in dead]
        if not targets:
            stats["errors"] += 1
            log.write("E %d %d\n" % (oi, 107))  # ENOTCONN
            return
        pending[oi] = len(targets)
        for t in targets:
            h = handles[t]
            cb = completion(oi)
            try:
                if kind == "write":
                    buf = nbd.Buffer.from_bytearray(pattern_data(oi, op["len"]))
                    keep.append(buf)
                    h.aio_pwrite(buf, op["off"], completion=cb, flags=flags)
                elif kind == "zero":
                    if op.get("noHole"):
                        flags |= nbd.CMD_FLAG_NO_HOLE
                    h.aio_zero(op["len"], op["off"], completion=cb, flags=flags)
                elif kind == "trim":
                    h.aio_trim(op["len"], op["off"], completion=cb, flags=flags)
                elif kind == "flush":
                    stats["flushes"] += 1
                    h.aio_flush(completion=cb)
                else:
                    raise ValueError("unknown op kind %r (op %d)" % (kind, oi))
            except nbd.Error:
                # The handle refused to queue the command: the connection is gone (ENOTCONN).
                dead.add(t)
                cb(type("E", (), {"value": 107})())

    def pump():
        """Moves bytes on every live connection; marks connections that fail as dead."""
        rl, wl, owner = [], [], {}
        for i, h in enumerate(handles):
            if i in dead:
                continue
            try:
                fd = h.aio_get_fd()
                d = h.aio_get_direction()
            except nbd.Error:
                dead.add(i)
                continue
            owner[fd] = i
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
        if not owner:
            return
        r, wr, _ = select.select(rl, wl, [], 0.5)
        for fd in wr:
            try:
                handles[owner[fd]].aio_notify_write()
            except nbd.Error:
                dead.add(owner[fd])
        for fd in r:
            try:
                handles[owner[fd]].aio_notify_read()
            except nbd.Error:
                dead.add(owner[fd])

    reason = None
    for bi, batch in enumerate(batches):
        log.write("B %d\n" % bi)
        stats["batches"] += 1
        for oi in batch:
            submit(oi)
        while pending:
            if time.monotonic() > deadline:
                reason = "deadline"
                break
            if dead:
                break
            pump()
        if reason is None and (pending or dead):
            reason = "connection lost"
        if reason is not None:
            break
        keep.clear()

    if reason is not None:
        for oi in sorted(pending):
            stats["errors"] += 1
            log.write("E %d %d\n" % (oi, 107))
        log.write("X %s\n" % reason)
    else:
        log.write("D\n")
        try:
            if want_hash:
                size = handles[0].get_size()
                digest = hashlib.sha256()
                step = 4 * 1024 * 1024
                for off in range(0, size, step):
                    digest.update(handles[0].pread(min(step, size - off), off))
                stats["sha256"] = digest.hexdigest()
            for h in handles:
                h.shutdown()
        except nbd.Error as e:
            # Only a crash test kills the server this late; the summary says so.
            reason = "after the last batch: %s" % e
            log.write("X %s\n" % reason)
    log.close()
    stats["multiConn"] = multi
    stats["stopped"] = reason
    print(json.dumps(stats))


main()
