"""Large reads from two servers of the same image, compared with each other and with the file.

Usage: _large_reads.py CONFIG_JSON

CONFIG_JSON: {"ref": URI, "got": URI, "file": PATH, "fileOffset": N,
              "lengths": [..], "boundaries": [..], "modes": [{"structured": b, "df": b}, ..],
              "structuredTailGuard": null | "got" | "skip"}

For every mode, one connection to each server is made (structured replies requested or not);
for every length, reads at offset 0, an aligned and an unaligned offset, around each boundary
(hole/data edges and the end of the file, given relative to the export), ending exactly at the
export's end and one byte before it (reads of 8 MiB and more only at 0, 4097 and the end). Each read is compared with the file's bytes (from
fileOffset, zero past its end, as the export pads it) and, with structured replies, the chunk
lists (offset, length, data or hole) of the two servers are compared too. With DF a reply must
be one chunk.

The last stdout line is a JSON summary; differences are listed there, not raised.
"""

import json
import sys

import nbd


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["file"], "rb") as f:
        f.seek(cfg["fileOffset"])
        file_bytes = f.read()
    out = {"sizes": [], "reads": 0, "bytes": 0, "mismatches": [], "chunkDiffs": [],
           "dfMultiChunk": [], "structuredSeen": [], "dfSeen": []}

    def note(kind, item):
        if len(out[kind]) < 10:
            out[kind].append(item)

    for mode in cfg["modes"]:
        hs = []
        for uri in (cfg["ref"], cfg["got"]):
            h = nbd.NBD()
            h.set_request_structured_replies(mode["structured"])
            h.connect_uri(uri)
            hs.append(h)
        sizes = [h.get_size() for h in hs]
        out["sizes"].append(sizes)
        out["structuredSeen"].append([h.get_structured_replies_negotiated() for h in hs])
        out["dfSeen"].append([h.can_df() for h in hs])
        size = sizes[0]
        if sizes[0] != sizes[1]:
            note("mismatches", {"sizes": sizes})
            continue

        def want(off, ln):
            b = file_bytes[off:off + ln]
            return b + bytes(ln - len(b))

        reads = []
        for ln in cfg["lengths"]:
            if ln > size:
                continue
            if ln >= 8 << 20:
                # Few, but each kind: aligned, unaligned, ending at the end and just before it.
                offs = {0, 4097, size - ln, size - ln - 1}
            else:
                offs = {0, (size // 3) & ~4095, ((size // 5) | 1) + 6, size - ln, size - ln - 1}
                for b in cfg["boundaries"]:
                    offs.update({b - ln, b - ln // 2, b, b - 1})
            reads += [(o, ln) for o in sorted(offs) if 0 <= o <= size - ln]

        guard = cfg.get("structuredTailGuard")
        flags = nbd.CMD_FLAG_DF if mode["df"] else 0
        for (off, ln) in reads:
            # qemu-nbd 7.2 aborts (an assertion in nbd_co_send_sparse_read) on a structured read
            # of the export's last bytes when -o is not a multiple of 512: such reads go to the
            # "got" server alone ("got"), or nowhere when it is qemu-nbd too ("skip").
            tail = mode["structured"] and off + ln > size - 512
            if tail and guard == "skip":
                continue
            alone = tail and guard == "got"
            results = [] if not alone else [None]
            for h in (hs if not alone else hs[1:]):
                if mode["structured"]:
                    buf = bytearray(ln)
                    chunks = []

                    def cb(sub, coff, status, err, buf=buf, chunks=chunks, off=off):
                        kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}.get(status, status)
                        chunks.append((coff - off, len(sub), kind))
                        buf[coff - off:coff - off + len(sub)] = sub
                        return 0

                    h.pread_structured(ln, off, cb, flags=flags)
                    results.append((bytes(buf), sorted(chunks)))
                else:
                    results.append((h.pread(ln, off, flags=flags), None))
            out["reads"] += len(results) - results.count(None)
            out["bytes"] += (len(results) - results.count(None)) * ln
            w = want(off, ln)
            for name, res in zip(("ref", "got"), results):
                if res is None:
                    continue
                data, chunks = res
                if data != w:
                    first = next(i for i in range(ln) if data[i] != w[i])
                    note("mismatches", {"server": name, "mode": mode, "offset": off,
                                        "length": ln, "firstDiff": off + first})
                if mode["df"] and chunks is not None and len(chunks) != 1:
                    note("dfMultiChunk", {"server": name, "offset": off, "length": ln,
                                          "chunks": chunks[:4]})
            if mode["structured"] and not alone and results[0][1] != results[1][1]:
                note("chunkDiffs", {"mode": mode, "offset": off, "length": ln,
                                    "ref": results[0][1][:6], "got": results[1][1][:6]})
        for h in hs:
            h.shutdown()
    print(json.dumps(out))


main()
