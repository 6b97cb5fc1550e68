/**
 * qemu's curl filename parsing and option checks, without a server: expected messages are what
 * qemu-nbd 7.2 printed for the same options (--image-opts driver=http,...).
 */

import assert from "node:assert/strict";
import { parseHttpFilename } from "../../lib/block/protocols/http_filename.ts";
import { parseCurlOptions } from "../../lib/block/protocols/http.ts";
import { BlockError, Errno } from "../../lib/block/types.ts";

const URL = "http://127.0.0.1:8080/disk.img";

Deno.test("parseHttpFilename: the whole string is the url, query and fragment included", () => {
  assert.deepEqual(parseHttpFilename(URL), { url: URL });
  assert.deepEqual(parseHttpFilename(`${URL}?a=b,c=d#frag`), { url: `${URL}?a=b,c=d#frag` });
  assert.deepEqual(parseHttpFilename("https://h/x%20y"), { url: "https://h/x%20y" });
});

function message(opts: Record<string, string>, driver: "http" | "https" = "http"): string {
  try {
    parseCurlOptions(opts, { writable: false, driver });
  } catch (e) {
    if (e instanceof BlockError) return e.message;
    throw e;
  }
  return "ok";
}

Deno.test("parseCurlOptions: defaults and accepted values", () => {
  const o = parseCurlOptions({ url: URL }, { writable: false, driver: "http" });
  assert.equal(o.readahead, 256 * 1024);
  assert.equal(o.timeoutSeconds, 5);
  assert.equal(o.sslVerify, true);
  const p = parseCurlOptions(
    { url: URL, readahead: "1M", timeout: "0", sslverify: "n", cookie: "a=b", foo: "x" },
    { writable: false, driver: "http" },
  );
  assert.equal(p.readahead, 1024 * 1024);
  assert.equal(p.timeoutSeconds, 0);
  assert.equal(p.sslVerify, false);
  assert.equal(p.cookie, "a=b");
  assert.deepEqual(p.unknown, ["foo"]);
});

Deno.test("parseCurlOptions: qemu-nbd 7.2's messages", () => {
  const cases: [Record<string, string>, string][] = [
    [{ url: URL, readahead: "1000" }, "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512"],
    [
      { url: URL, readahead: "1x" },
      "Parameter 'readahead' expects a non-negative number below 2^64\n" +
      "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
      "and exabytes, respectively.",
    ],
    [{ url: URL, timeout: "10001" }, "timeout parameter is too large or negative"],
    [{ url: URL, timeout: "-1" }, "timeout parameter is too large or negative"],
    [{ url: URL, timeout: "1.5" }, "Parameter 'timeout' expects a number"],
    [{ url: URL, sslverify: "ON" }, "Parameter 'sslverify' expects 'on' or 'off'"],
    [
      { url: URL, cookie: "a", "cookie-secret": "b" },
      "curl driver cannot handle both cookie and cookie secret",
    ],
    [{}, "curl block driver requires an 'url' option"],
    [
      { url: URL },
      "https curl driver cannot handle the URL 'http://127.0.0.1:8080/disk.img' (does not start with 'https://')",
    ],
  ];
  for (const [opts, want] of cases) {
    assert.equal(message(opts, opts === cases.at(-1)![0] ? "https" : "http"), want);
  }
  assert.match(message({ url: URL, "password-secret": "pw" }), /^No secret with id 'pw'/);
  assert.match(message({ url: URL, "proxy-password-secret": "p" }), /^No secret with id 'p'/);
  assert.match(message({ url: URL, "cookie-secret": "c" }), /--object secrets yet/);
});

Deno.test("parseCurlOptions: a writable open is refused before anything else", () => {
  try {
    parseCurlOptions({ readahead: "1000" }, { writable: true, driver: "http" });
    assert.fail("accepted");
  } catch (e) {
    assert(e instanceof BlockError);
    assert.equal(e.errno, Errno.EACCES);
    assert.equal(e.message, "curl driver does not support writes");
  }
});
