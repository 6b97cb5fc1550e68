/**
 * MULTI_CONN: with `-e 0` the export advertises it and a flush on one connection makes a write
 * from another visible to a third; with the default `-e 1` it is not advertised.
 */

import assert from "node:assert/strict";
import { makeSparseImage, MiB, runPython, withServer, withTempDir } from "./_harness.ts";

const SCRIPT = `
import json, sys, nbd
U = sys.argv[1]
hs = [nbd.NBD() for _ in range(3)]
for h in hs:
    h.connect_uri(U)
w, f, r = hs
o = dict(multi=[h.can_multi_conn() for h in hs])
before = r.pread(4096, 65536)
w.pwrite(b"\\x5a" * 4096, 65536)
f.flush()
after = r.pread(4096, 65536)
o["before"] = before[:2].hex()
o["after"] = after[:2].hex() + after[-2:].hex()
o["all_5a"] = after == b"\\x5a" * 4096
for h in hs:
    h.shutdown()
print(json.dumps(o))
`;

Deno.test("multi-conn: -e 0 advertises CAN_MULTI_CONN; write, flush, read on three connections", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 2 * MiB);
    await withServer({ dir, image, args: ["-f", "raw", "-t", "-e", "0"] }, async (server) => {
      const r = await runPython<Record<string, unknown>>(SCRIPT, [server.uri]);
      assert.deepEqual(r, {
        multi: [true, true, true],
        before: "0000",
        after: "5a5a5a5a",
        all_5a: true,
      });
    });
  });
});

Deno.test("multi-conn: the default -e 1 does not advertise CAN_MULTI_CONN", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/a.img`;
    await makeSparseImage(image, 2 * MiB);
    await withServer({ dir, image, args: ["-f", "raw", "-t"] }, async (server) => {
      const r = await runPython<{ multi: boolean }>(
        `
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print(json.dumps(dict(multi=h.can_multi_conn())))
`,
        [server.uri],
      );
      assert.deepEqual(r, { multi: false });
    });
  });
});
