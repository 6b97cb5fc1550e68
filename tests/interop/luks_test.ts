/**
 * LUKS exports against qemu-nbd 7.2: raw `luks` volumes made by qemu-img with several ciphers,
 * modes, IV generators and hashes, and qcow2 images with `encrypt.format=luks` (64 KiB and 4 KiB
 * clusters, zero and compressed clusters, a raw backing file), all with `iter-time=10` so key
 * setup stays fast. denbd and qemu-nbd serve copies of one image side by side with the same
 * `--object secret` and `--image-opts`; compared: the guest bytes (`qemu-img compare` between
 * the two exports), `nbdinfo --size`, `--map`, `--map=qemu:allocation-depth` (-A), and the
 * advertised flags and block sizes (`nbdinfo --json`).
 *
 * Writes (aligned, unaligned, zeroes, across clusters) go through NBD with qemu-io and, as the
 * same commands, straight into a copy with qemu-io: raw volumes must end byte-identical (the
 * encryption is deterministic), qcow2 images must read the same and pass `qemu-img check`.
 * Wrong, missing and unknown keys and damaged headers fail to open with qemu-nbd's message; a
 * qcow2 volume killed with SIGKILL during writes stays clean for `qemu-img check`.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  MiB,
  run,
  runOk,
  type Server,
  SERVER_KIND,
  serverArgv,
  sha256File,
  sleep,
  withServer,
  withServers,
  withTempDir,
} from "./_harness.ts";

const SECRET = ["--object", "secret,id=s0,data=abc"];

function luksOpts(path: string): string {
  return `driver=luks,key-secret=s0,file.filename=${path}`;
}

function qcowOpts(path: string): string {
  return `driver=qcow2,encrypt.key-secret=s0,file.filename=${path}`;
}

/** Key setup measures PBKDF2 speed first: slow on a loaded host, hence the long timeouts. */
const SLOW = { timeoutMs: 90_000 };

async function qimg(...args: string[]): Promise<void> {
  await runOk(["qemu-img", ...args], SLOW);
}

/** qemu-io on an image given as --image-opts (with the secret). */
async function qioOpts(opts: string, cmds: readonly string[], extra: string[] = []): Promise<void> {
  await runOk(
    ["qemu-io", ...SECRET, ...extra, "--image-opts", ...cmds.flatMap((c) => ["-c", c]), opts],
    SLOW,
  );
}

async function qioUri(uri: string, cmds: readonly string[]): Promise<void> {
  await runOk(["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri]);
}

async function nbdinfo(...args: string[]): Promise<string> {
  return (await runOk(["nbdinfo", ...args])).stdout;
}

/** `nbdinfo --json` without the URI: flags, sizes, contexts. */
async function info(uri: string): Promise<string> {
  const j = JSON.parse(await nbdinfo("--json", uri));
  delete j["exports"]?.[0]?.["uri"];
  return JSON.stringify(j);
}

/** One raw LUKS configuration of qemu-img create. */
interface LuksCipher {
  readonly alg: string;
  readonly mode: string;
  readonly ivgen: string;
  readonly hash: string;
}

const CIPHERS: readonly LuksCipher[] = [
  { alg: "aes-256", mode: "xts", ivgen: "plain64", hash: "sha256" }, // qemu-img's default
  { alg: "aes-128", mode: "cbc", ivgen: "essiv", hash: "sha256" },
  { alg: "aes-256", mode: "cbc", ivgen: "plain", hash: "sha512" },
  { alg: "aes-128", mode: "ecb", ivgen: "plain64", hash: "sha1" },
  { alg: "aes-256", mode: "ctr", ivgen: "plain64", hash: "ripemd160" },
  { alg: "aes-128", mode: "xts", ivgen: "plain64", hash: "md5" },
  { alg: "aes-192", mode: "xts", ivgen: "essiv", hash: "sha256" },
];

function cipherName(c: LuksCipher): string {
  return `${c.alg}-${c.mode}-${c.ivgen}-${c.hash}`;
}

/**
 * The images every test starts from, made once (qemu-img measures PBKDF2 speed for about a
 * second per volume it creates) in a directory removed when the test module unloads. Tests
 * work on copies.
 */
let corpusDir: Promise<string> | undefined;

function corpus(): Promise<string> {
  corpusDir ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "denbd-luks-" });
    globalThis.addEventListener("unload", () => {
      try {
        Deno.removeSync(dir, { recursive: true });
      } catch { /* already gone */ }
    });
    for (const c of CIPHERS) await makeLuks(`${dir}/${cipherName(c)}.luks`, c, "1536k");
    for (const [i, im] of QCOW2_IMAGES.entries()) await im.build(dir, `${dir}/q${i}.qcow2`);
    return dir;
  })();
  return corpusDir;
}

/** A private copy of corpus image `name` in `dir` (qcow2 backing files come along). */
async function copyOf(dir: string, name: string, as = name): Promise<string> {
  const src = await corpus();
  for (const extra of ["base.raw"]) {
    await Deno.copyFile(`${src}/${extra}`, `${dir}/${extra}`).catch(() => {});
  }
  await Deno.copyFile(`${src}/${name}`, `${dir}/${as}`);
  return `${dir}/${as}`;
}

/** A raw LUKS volume of `size` with some data written by qemu-io. */
async function makeLuks(path: string, c: LuksCipher, size: string): Promise<void> {
  await qimg(
    "create",
    "-q",
    "-f",
    "luks",
    ...SECRET,
    "-o",
    `key-secret=s0,iter-time=10,cipher-alg=${c.alg},cipher-mode=${c.mode},ivgen-alg=${c.ivgen},hash-alg=${c.hash}`,
    path,
    size,
  );
  await qioOpts(luksOpts(path), [
    "write -P 0x5a 0 64k",
    "write -P 0x5b 1000 3000",
    "write -P 0x5c 512k 256k",
  ]);
}

/** Serves a private copy of `img` on denbd and on qemu-nbd, with `--image-opts OPTS(copy)`. */
async function sideBySide(
  dir: string,
  img: string,
  opts: (copy: string) => string,
  extra: readonly string[],
  fn: (d: Server, q: Server) => Promise<void>,
): Promise<void> {
  const copies = [`${img}.denbd`, `${img}.qemu`];
  for (const c of copies) await Deno.copyFile(img, c);
  const [a, b] = copies.map((c) => ({ args: [...SECRET, ...extra, "--image-opts", opts(c)] }));
  await withServers([
    { dir, kind: SERVER_KIND, ...a! },
    { dir, kind: "qemu-nbd", ...b! },
  ], async ([d, q]) => await fn(d!, q!));
  for (const c of copies) await Deno.remove(c);
}

async function compareViews(d: Server, q: Server, depth = false): Promise<void> {
  await runOk(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, q.uri]);
  assert.equal(await nbdinfo("--size", d.uri), await nbdinfo("--size", q.uri));
  assert.equal(await nbdinfo("--map", d.uri), await nbdinfo("--map", q.uri));
  if (depth) {
    assert.equal(
      await nbdinfo("--map=qemu:allocation-depth", d.uri),
      await nbdinfo("--map=qemu:allocation-depth", q.uri),
    );
  }
  assert.equal(await info(d.uri), await info(q.uri));
}

Deno.test("luks: reads, sizes, maps and flags as qemu-nbd, for each cipher", async (t) => {
  await withTempDir(async (dir) => {
    const imgs: string[] = [];
    for (const c of CIPHERS) imgs.push(await copyOf(dir, `${cipherName(c)}.luks`));
    for (const [i, c] of CIPHERS.entries()) {
      await t.step(cipherName(c), async () => {
        await sideBySide(dir, imgs[i]!, luksOpts, ["-t"], (d, q) => compareViews(d, q));
      });
    }
    await t.step("read-only, json: filename", async () => {
      const json = (p: string) =>
        `json:{"driver":"luks","key-secret":"s0","file":{"driver":"file","filename":"${p}"}}`;
      const img = imgs[0]!;
      await withServers([
        { dir, kind: SERVER_KIND, args: [...SECRET, "-r", "-t", json(img)] },
        { dir, kind: "qemu-nbd", args: [...SECRET, "-r", "-t", "--image-opts", luksOpts(img)] },
      ], async ([d, q]) => await compareViews(d!, q!));
    });
  });
});

/** Writes: aligned, unaligned inside a sector and across sectors, zeroes, a large one. */
function writeScript(size: number): string[] {
  return [
    "write -P 0x91 0 4096",
    "write -P 0x92 100 1000",
    "write -P 0x93 5000 7",
    `write -P 0x94 ${size - 777} 777`,
    "write -z 8192 70000",
    "write -z 300 100",
    "write -P 0x95 300k 600k",
    "aio_write -P 0x96 64k 4096",
    "aio_write -P 0x97 72k 4097",
    "aio_flush",
  ];
}

Deno.test("luks: writes through NBD are byte-identical to qemu-io's", async (t) => {
  await withTempDir(async (dir) => {
    for (const c of [CIPHERS[0]!, CIPHERS[1]!, CIPHERS[6]!]) {
      await t.step(cipherName(c), async () => {
        const viaNbd = await copyOf(dir, `${cipherName(c)}.luks`, "nbd.luks");
        const direct = await copyOf(dir, `${cipherName(c)}.luks`, "direct.luks");
        const cmds = writeScript(1536 * 1024);
        await withServer(
          { dir, args: [...SECRET, "--image-opts", luksOpts(viaNbd)] },
          async (s) => await qioUri(s.uri, cmds),
        );
        await qioOpts(luksOpts(direct), cmds);
        await runOk([
          "qemu-img",
          "compare",
          ...SECRET,
          "--image-opts",
          luksOpts(viaNbd),
          luksOpts(direct),
        ]);
        // Same master key, same IVs: the ciphertext is the same too.
        assert.equal(await sha256File(viaNbd), await sha256File(direct));
      });
    }
  });
});

/** qcow2 images with LUKS encryption: name → builder. */
const QCOW2_IMAGES: readonly { name: string; build(dir: string, img: string): Promise<void> }[] = [
  {
    name: "64k clusters, data, zero and compressed clusters",
    async build(_dir, img) {
      await qimg(
        "create",
        ..."-q -f qcow2".split(" "),
        ...SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        img,
        "6M",
      );
      await qioOpts(qcowOpts(img), [
        "write -P 0xab 0 100k",
        "write -P 0x12 1536 3000",
        "write -z 2M 256k",
        "write -P 0x13 3M 64k",
        "write -z 3M 4k",
        "write -c -P 0x77 4M 64k",
      ]);
    },
  },
  {
    name: "4k clusters over a raw backing file",
    async build(dir, img) {
      await qimg("create", "-q", "-f", "raw", `${dir}/base.raw`, "4M");
      await runOk([
        "qemu-io",
        ..."-f raw -c".split(" "),
        "write -P 0x31 0 1M",
        "-c",
        "write -P 0x32 3M 4k",
        `${dir}/base.raw`,
      ]);
      await qimg(
        "create",
        ..."-q -f qcow2 -b base.raw -F raw".split(" "),
        ...SECRET,
        "-o",
        "cluster_size=4096,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        img,
        "4M",
      );
      await qioOpts(qcowOpts(img), [
        "write -P 0x41 512k 10k",
        "write -z 3M 4k",
        "write -P 0x42 2M 1536",
      ]);
    },
  },
];

Deno.test("luks: qcow2 encrypt.format=luks reads as qemu-nbd (maps, depth, flags)", async (t) => {
  await withTempDir(async (dir) => {
    for (const [i, im] of QCOW2_IMAGES.entries()) {
      await t.step(im.name, async () => {
        const img = await copyOf(dir, `q${i}.qcow2`);
        await sideBySide(dir, img, qcowOpts, ["-t", "-A"], (d, q) => compareViews(d, q, true));
      });
    }
  });
});

Deno.test("luks: qcow2 writes through NBD match qemu-io, check clean", async (t) => {
  await withTempDir(async (dir) => {
    for (const [i, im] of QCOW2_IMAGES.entries()) {
      await t.step(im.name, async () => {
        const viaNbd = await copyOf(dir, `q${i}.qcow2`, `w${i}.nbd.qcow2`);
        const direct = await copyOf(dir, `q${i}.qcow2`, `w${i}.direct.qcow2`);
        const cmds = [
          ...writeScript(4 * MiB),
          "write -P 0x98 100k 200k", // over allocated and unallocated clusters
          "write -P 0x99 2M 100", // partial cluster: copy-on-write from the zero/backing data
          "write -z 1M 1M",
          "discard 3M 64k",
        ];
        await withServer(
          { dir, args: [...SECRET, "--discard=unmap", "--image-opts", qcowOpts(viaNbd)] },
          async (s) => await qioUri(s.uri, cmds),
        );
        await qioOpts(qcowOpts(direct), cmds, ["-d", "unmap"]);
        await runOk([
          "qemu-img",
          "compare",
          ...SECRET,
          "--image-opts",
          qcowOpts(viaNbd),
          qcowOpts(direct),
        ]);
        const check = await run([
          "qemu-img",
          "check",
          ...SECRET,
          "--image-opts",
          qcowOpts(viaNbd),
        ]);
        assert.equal(check.code, 0, check.stdout + check.stderr);
        assert.match(check.stdout, /No errors were found on the image/);
      });
    }
  });
});

/** Patches bytes of a copy of `img`. */
async function patched(
  img: string,
  out: string,
  patch: (b: Uint8Array, v: DataView) => void,
): Promise<string> {
  const b = await Deno.readFile(img);
  patch(b, new DataView(b.buffer));
  await Deno.writeFile(out, b);
  return out;
}

/** What both servers print after the blk_new_open frame (qemu names --image-opts in full). */
function message(stderr: string): string {
  const m = /Failed to blk_new_open '.*?': (.*)$/m.exec(stderr);
  return m?.[1] ?? stderr.trim();
}

Deno.test("luks: wrong, missing and unknown keys and damaged headers, as qemu-nbd", async (t) => {
  await withTempDir(async (dir) => {
    const base = await copyOf(dir, `${cipherName(CIPHERS[0]!)}.luks`, "base.luks");
    const q = await copyOf(dir, "q0.qcow2", "base.qcow2");
    const enc = new TextEncoder();
    const text = (b: Uint8Array, at: number, s: string, len: number) => {
      b.fill(0, at, at + len);
      b.set(enc.encode(s), at);
    };
    const p = (n: string) => `${dir}/${n}`;
    const cases: { name: string; args: string[]; msg: RegExp }[] = [
      { name: "probed, no key", args: [base], msg: /Parameter 'key-secret' is required/ },
      { name: "-f luks, no key", args: ["-f", "luks", base], msg: /'key-secret' is required/ },
      {
        name: "wrong key",
        args: ["--object", "secret,id=s0,data=abd", "--image-opts", luksOpts(base)],
        msg: /Invalid password, cannot unlock any keyslot/,
      },
      {
        name: "unknown secret",
        args: [...SECRET, "--image-opts", luksOpts(base).replace("=s0", "=s9")],
        msg: /No secret with id 's9'/,
      },
      {
        name: "LUKS2",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("v2.luks"), (_b, v) => v.setUint16(6, 2))),
        ],
        msg: /LUKS version 2 is not supported/,
      },
      {
        name: "stripes",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("st.luks"), (_b, v) => v.setUint32(208 + 48 + 44, 7))),
        ],
        msg: /Keyslot 1 is corrupted \(stripes 7 != 4000\)/,
      },
      {
        name: "payload offset",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("po.luks"), (_b, v) => v.setUint32(104, 3))),
        ],
        msg: /payload is overlapping with the header/,
      },
      {
        name: "overlapping slots",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("ov.luks"), (_b, v) => v.setUint32(208 + 48 + 40, 16))),
        ],
        msg: /Keyslots 0 and 1 are overlapping/,
      },
      {
        name: "slot state",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("ss.luks"), (_b, v) => v.setUint32(208 + 96, 5))),
        ],
        msg: /Keyslot 2 state \(active\/disable\) is corrupted/,
      },
      {
        name: "cipher mode",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("cm.luks"), (b) => text(b, 40, "foo-plain64", 32))),
        ],
        msg: /Cipher mode 'foo' not supported/,
      },
      {
        name: "essiv without hash",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("eh.luks"), (b) => text(b, 40, "xts-essiv", 32))),
        ],
        msg: /Missing IV generator hash specification/,
      },
      {
        name: "hash",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("hs.luks"), (b) => text(b, 72, "sha999", 32))),
        ],
        msg: /Hash algorithm 'sha999' not supported/,
      },
      {
        name: "cipher name not terminated",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("nt.luks"), (b) => b.fill(0x41, 8, 40))),
        ],
        msg: /cipher name is not NUL terminated/,
      },
      {
        name: "key size",
        args: [
          ...SECRET,
          "--image-opts",
          luksOpts(await patched(base, p("ks.luks"), (_b, v) => v.setUint32(108, 20))),
        ],
        msg: /Algorithm 'aes' with key size 10 bytes not supported/,
      },
      { name: "qcow2, no key", args: [q], msg: /Parameter 'encrypt.key-secret' is required/ },
      {
        name: "qcow2, wrong key",
        args: ["--object", "secret,id=s0,data=x", "--image-opts", qcowOpts(q)],
        msg: /Invalid password/,
      },
      {
        name: "qcow2, encrypt.format=aes",
        args: [...SECRET, "--image-opts", `${qcowOpts(q)},encrypt.format=aes`],
        msg: /Header reported 'luks' encryption format but options specify 'aes'/,
      },
    ];
    // An unencrypted qcow2 with encrypt.format, and an encrypted one without its extension.
    const plain = `${dir}/plain.qcow2`;
    await qimg("create", "-q", "-f", "qcow2", plain, "1M");
    cases.push({
      name: "unencrypted qcow2, encrypt.format=luks",
      args: ["--image-opts", `driver=qcow2,encrypt.format=luks,file.filename=${plain}`],
      msg: /No encryption in image header, but options specified format 'luks'/,
    });
    const noExt = await patched(q, p("noext.qcow2"), (b, v) => {
      const hl = v.getUint32(100);
      for (let at = hl; at + 8 <= 4096;) {
        const type = v.getUint32(at), len = v.getUint32(at + 4);
        if (type === 0) break;
        if (type === 0x0537be77) v.setUint32(at, 0x12345678); // now an unknown extension
        at += 8 + ((len + 7) & ~7);
      }
      void b;
    });
    cases.push({
      name: "qcow2 without the crypto header extension",
      args: [...SECRET, "--image-opts", qcowOpts(noExt)],
      msg: /Missing CRYPTO header for crypt method 2/,
    });
    for (const c of cases) {
      await t.step(c.name, async () => {
        const d = await run([...serverArgv(SERVER_KIND), "-k", `${dir}/d.sock`, ...c.args], {
          timeoutMs: 20_000,
        });
        const r = await run(["qemu-nbd", "-k", `${dir}/q.sock`, ...c.args], {
          timeoutMs: 20_000,
        });
        assert.equal(d.code, 1, d.stderr);
        assert.equal(r.code, 1, r.stderr);
        assert.match(d.stderr, c.msg);
        assert.equal(message(d.stderr), message(r.stderr));
      });
    }
  });
});

Deno.test("luks: qcow2 killed with SIGKILL during writes stays clean", async () => {
  await withTempDir(async (dir) => {
    const img = await copyOf(dir, "q0.qcow2", "crash.qcow2");
    // A workload of allocating, partial and zero writes with flushes in between.
    const cmds: string[] = [];
    for (let i = 0; i < 3000; i++) {
      const off = ((i * 7919) % 90) * 65536 + ((i * 131) % 7) * 512 + (i % 3) * 100;
      if (i % 17 === 0) cmds.push("flush");
      else if (i % 11 === 0) cmds.push(`write -z ${off} 70000`);
      else cmds.push(`write -P ${(i % 250) + 1} ${off} ${4096 + (i % 5) * 30000}`);
    }
    for (let r = 0; r < 3; r++) {
      const args = [...SECRET, "-t", "--image-opts", qcowOpts(img)];
      await withServer({ dir, args }, async (s) => {
        const writer = run(
          ["qemu-io", "-f", "raw", ...cmds.flatMap((c) => ["-c", c]), s.uri],
          { timeoutMs: 30_000 },
        );
        await sleep(150 + r * 200);
        assert.ok(s.running, s.stderr);
        Deno.kill(s.pid, "SIGKILL");
        await writer;
      });
      const check = await run(["qemu-img", "check", ...SECRET, "--image-opts", qcowOpts(img)]);
      // 3: leaked clusters only, which a kill may leave (qemu-nbd leaves them too).
      assert.ok(check.code === 0 || check.code === 3, check.stdout + check.stderr);
      assert.doesNotMatch(check.stdout, /ERROR/);
      // The image still opens and reads with the key.
      await runOk([
        "qemu-img",
        "convert",
        ...SECRET,
        "--image-opts",
        qcowOpts(img),
        "-O",
        "raw",
        `${dir}/out.raw`,
      ]);
    }
  });
});
