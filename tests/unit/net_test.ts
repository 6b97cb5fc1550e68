/**
 * The fd-level transport without a server: FdConn over a socketpair (partial reads, writes
 * larger than the socket buffer, sendfile with its zero padding past the end of the file,
 * close waking a pending read), the readiness loop with io_uring and with epoll, listening
 * sockets and qemu-nbd's bind errors.
 */

import assert from "node:assert/strict";
import { closeSocket, socketPair, tryRecv, trySend } from "../../ffi/socket.ts";
import { cString, libc, O_CREAT, O_RDWR } from "../../ffi/libc.ts";
import { FdConn } from "../../lib/net/fd_conn.ts";
import { ReadinessLoop } from "../../lib/net/readiness.ts";
import { BindError, listenOn } from "../../lib/net/listen.ts";
import { formatSockAddr, resolveTcp } from "../../lib/net/address.ts";

const LOOPS: readonly { name: string; make: () => ReadinessLoop }[] = [
  { name: "default", make: () => new ReadinessLoop() },
  { name: "no spin", make: () => new ReadinessLoop({ spin: false }) },
  { name: "epoll", make: () => new ReadinessLoop({ spin: false, backend: "epoll" }) },
];

async function readExactly(conn: FdConn, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let got = 0;
  while (got < n) {
    const r = await conn.read(out.subarray(got));
    if (r === null) throw new Error(`EOF after ${got} of ${n} bytes`);
    got += r;
  }
  return out;
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

for (const { name, make } of LOOPS) {
  Deno.test(`net: FdConn moves 8 MiB both ways through a socketpair (${name})`, async () => {
    const loop = make();
    const [a, b] = socketPair();
    const ca = new FdConn(a, loop);
    const cb = new FdConn(b, loop);
    try {
      const data = pattern(8 << 20, 7);
      // Far more than a socket buffer: the writer must wait for the reader, in one thread.
      const writing = (async () => {
        let done = 0;
        while (done < data.length) done += await ca.write(data.subarray(done));
      })();
      // The reader starts late, so the writer fills the socket buffer and has to wait.
      await new Promise((resolve) => setTimeout(resolve, 20));
      const got = await readExactly(cb, data.length);
      await writing;
      assert.deepEqual(got, data);
      if (name === "epoll") assert.equal(loop.stats.backend, "epoll");
      if (name !== "default") assert.ok(loop.stats.parks > 0, "the writer parked for room");
      ca.close();
      assert.equal(await cb.read(new Uint8Array(16)), null, "EOF after the peer closed");
    } finally {
      ca.close();
      cb.close();
      await loop.close();
    }
  });

  Deno.test(`net: closing a connection ends its pending read (${name})`, async () => {
    const loop = make();
    const [a, b] = socketPair();
    const ca = new FdConn(a, loop);
    try {
      const pending = ca.read(new Uint8Array(16));
      setTimeout(() => ca.close(), 20);
      assert.equal(await pending, null);
      assert.throws(() => trySend(b, new Uint8Array(1)), /Broken pipe|reset/i);
    } finally {
      ca.close();
      closeSocket(b);
      await loop.close();
    }
  });
}

Deno.test("net: sendFile sends header and file range, zeroes past the end of the file", async () => {
  const dir = await Deno.makeTempDir();
  const loop = new ReadinessLoop();
  const [a, b] = socketPair();
  const ca = new FdConn(a, loop);
  const cb = new FdConn(b, loop);
  const path = `${dir}/f`;
  const content = pattern(300_000, 3);
  await Deno.writeFile(path, content);
  const fd = libc().open(cString(path), O_RDWR | O_CREAT, 0o644);
  try {
    const header = new Uint8Array([1, 2, 3, 4, 5]);
    // 200 000 bytes from offset 150 000: 150 000 from the file, then 50 000 zeroes.
    const sending = ca.sendFile(header, fd, 150_000, 200_000);
    const got = await readExactly(cb, 5 + 200_000);
    await sending;
    assert.deepEqual(got.subarray(0, 5), header);
    assert.deepEqual(got.subarray(5, 5 + 150_000), content.subarray(150_000));
    assert.ok(got.subarray(5 + 150_000).every((x) => x === 0), "zeroes past the end of the file");
    assert.equal(tryRecv(b, new Uint8Array(8)), -1, "nothing more was sent");
  } finally {
    libc().close(fd);
    ca.close();
    cb.close();
    await loop.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("net: a unix listener accepts, and bind errors use qemu-nbd's words", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/s.sock`;
    const [ls] = listenOn({ transport: "unix", path });
    assert.ok(ls !== undefined && !ls.tcp);
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
    closeSocket(ls.fd);
    assert.throws(
      () => listenOn({ transport: "unix", path: `${dir}/no/such/dir.sock` }),
      (e: unknown) =>
        e instanceof BindError &&
        e.message === `Failed to bind socket to ${dir}/no/such/dir.sock: No such file or directory`,
    );
    assert.throws(
      () => listenOn({ transport: "unix", path: `${dir}/${"a".repeat(120)}` }),
      /is too long\nPath must be less than 108 bytes$/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("net: TCP on port 0 reports the real port; a taken port is qemu-nbd's message", () => {
  const [ls] = listenOn({ transport: "tcp", hostname: "127.0.0.1", port: 0 });
  assert.ok(ls !== undefined && ls.tcp && ls.port > 0);
  try {
    assert.throws(
      () => listenOn({ transport: "tcp", hostname: "127.0.0.1", port: ls.port }),
      (e: unknown) =>
        e instanceof BindError && e.inUse &&
        e.message === "Failed to find an available port: Address already in use",
    );
  } finally {
    closeSocket(ls.fd);
  }
});

Deno.test("net: names resolve to every address, numeric ones as themselves", () => {
  assert.deepEqual(resolveTcp("127.0.0.1", 10809).map(formatSockAddr), ["127.0.0.1:10809"]);
  assert.deepEqual(resolveTcp("::1", 80).map(formatSockAddr), ["[::1]:80"]);
  assert.ok(resolveTcp("localhost", 1).map(formatSockAddr).includes("127.0.0.1:1"));
  assert.throws(() => resolveTcp("nosuch.invalid", 1), /address resolution failed for nosuch/);
});
