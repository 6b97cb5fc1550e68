/**
 * The `rbd:` filename parser (qemu_rbd_parse_filename's rules) and the option checks done before
 * librados is touched, plus a seeded fuzz of the parser: only BlockErrors, always an answer.
 */

import assert from "node:assert/strict";
import { KEYVALUE_PAIRS, parseRbdFilename } from "../../lib/block/protocols/rbd_filename.ts";
import { openRbdProtocol } from "../../lib/block/protocols/rbd.ts";
import { BlockError } from "../../lib/block/types.ts";

Deno.test("rbd filename: pool, namespace, image, snapshot, conf, id and key/value pairs", () => {
  assert.deepEqual(parseRbdFilename("rbd:pool/img"), {
    pool: "pool",
    namespace: "",
    image: "img",
  });
  assert.deepEqual(parseRbdFilename("rbd:p/ns/img@snap:conf=/etc/c.conf:id=admin"), {
    pool: "p",
    namespace: "ns",
    image: "img",
    snapshot: "snap",
    conf: "/etc/c.conf",
    user: "admin",
  });
  const kv = parseRbdFilename("rbd:p/i:mon_host=1.2.3.4\\:6789:client_mount_timeout=5");
  assert.deepEqual(JSON.parse(kv[KEYVALUE_PAIRS]!), [
    "mon_host",
    "1.2.3.4:6789",
    "client_mount_timeout",
    "5",
  ]);
  // Escapes: "\/" keeps a slash in the pool, "\:" a colon in the image.
  assert.equal(parseRbdFilename("rbd:a\\/b/c").pool, "a/b");
  assert.equal(parseRbdFilename("rbd:p/x\\:y").image, "x:y");
  // qemu's quirk: an '@' anywhere after the pool starts the snapshot.
  const q = parseRbdFilename("rbd:p/img:conf=a@b");
  assert.equal(q.image, "img:conf=a");
  assert.equal(q.snapshot, "b");
  assert.equal(parseRbdFilename("rbd:p/").image, "");
});

Deno.test("rbd filename: qemu's refusals", () => {
  assert.throws(() => parseRbdFilename("rbd:pool"), /^BlockError: Pool name is required$/);
  assert.throws(() => parseRbdFilename("rbd:p/i:id"), /conf option id has no value/);
  assert.throws(() => parseRbdFilename("nbd:x"), /File name must start with 'rbd:'/);
});

Deno.test("rbd options: qemu's QAPI messages before any cluster access", async () => {
  const ctx = { writable: false, warn: () => {}, noCache: false };
  await assert.rejects(openRbdProtocol({ image: "i" }, ctx), /Parameter 'pool' is missing/);
  await assert.rejects(openRbdProtocol({ pool: "p" }, ctx), /Parameter 'image' is missing/);
  await assert.rejects(
    openRbdProtocol({ pool: "p", image: "i", foo: "1" }, ctx),
    /Parameter 'foo' is unexpected/,
  );
  await assert.rejects(
    openRbdProtocol({ pool: "p", image: "i", "key-secret": "s" }, ctx),
    /not supported yet/,
  );
});

Deno.test("rbd filename: fuzz (seeded) gives options or a BlockError, never anything else", () => {
  let x = 0x9e3779b9;
  const rnd = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  const alphabet = "ab/@:=\\\\,x";
  for (let i = 0; i < 20_000; i++) {
    let s = "rbd:";
    const n = rnd() % 24;
    for (let j = 0; j < n; j++) s += alphabet[rnd() % alphabet.length];
    try {
      const o = parseRbdFilename(s);
      assert.equal(typeof o["pool"], "string");
      assert.equal(typeof o["image"], "string");
      if (o[KEYVALUE_PAIRS] !== undefined) {
        assert.equal((JSON.parse(o[KEYVALUE_PAIRS]) as string[]).length % 2, 0);
      }
    } catch (e) {
      assert.ok(e instanceof BlockError, `${s}: ${e}`);
    }
  }
});
