// --object: qemu's keyval syntax, the QAPI member checks, secrets and authorization objects.
import assert from "node:assert/strict";
import { createCipheriv, randomBytes } from "node:crypto";
import { parseKeyval } from "../../lib/objects/keyval.ts";
import { createObjects, ObjectRegistry } from "../../lib/objects/registry.ts";
import { globMatch, listAllows } from "../../lib/objects/authz.ts";
import type { Authorizer } from "../../lib/tls/server_tls.ts";

Deno.test("keyval: implied type, escaped commas, later keys win, help", () => {
  const r = parseKeyval("secret,id=s,data=a,,b,id=t", "qom-type");
  assert.deepEqual([...r.pairs], [["qom-type", "secret"], ["id", "t"], ["data", "a,b"]]);
  assert.equal(r.help, false);
  assert.equal(parseKeyval("secret,help", "qom-type").help, true);
  assert.equal(parseKeyval("help", "qom-type").help, true);
  assert.throws(() => parseKeyval(",", "qom-type"), /Invalid parameter ''/);
  assert.throws(() => parseKeyval("secret,id", "qom-type"), /Expected '=' after parameter 'id'/);
});

Deno.test("registry: qemu's member checks in its order", () => {
  const bad: [string, RegExp][] = [
    ["data=1", /Parameter 'qom-type' is missing/],
    ["nosuch,id=a", /does not accept value 'nosuch'/],
    ["secret,data=1", /Parameter 'id' is missing/],
    ["secret,id=9,data=1", /expects an identifier/],
    ["secret,id=a,data=1,bogus=2", /Parameter 'bogus' is unexpected/],
    ["secret,id=a,data=1,format=hex", /Parameter 'format' does not accept value 'hex'/],
    ["authz-list,id=l,policy=maybe", /Parameter 'policy' does not accept value 'maybe'/],
    ["tls-creds-anon,id=t,verify-peer=perhaps", /Parameter 'verify-peer' expects 'on' or 'off'/],
    ["authz-pam,id=p,service=x", /invalid object type: authz-pam/],
    ["iothread,id=i", /object type 'iothread' is not supported by denbd yet/],
    ["secret,id=a,data=1,loaded=on", /Property 'secret.loaded' is not writable/],
  ];
  for (const [text, want] of bad) assert.throws(() => new ObjectRegistry().add(text), want, text);
  const r = new ObjectRegistry();
  r.add("secret,id=a,data=1");
  assert.throws(() => r.add("secret,id=a,data=2"), /duplicate property 'a'/);
  assert.throws(() => r.secretBytes("b"), /No secret with id 'b'/);
  r.add("authz-simple,id=z,identity=x");
  assert.throws(() => r.secretBytes("z"), /Object with id 'z' is not a secret/);
});

Deno.test("secret: raw, base64, file and AES-256-CBC with keyid/iv", () => {
  const dir = Deno.makeTempDirSync();
  try {
    Deno.writeTextFileSync(`${dir}/pw`, "from-file");
    const key = randomBytes(32);
    const iv = randomBytes(16);
    const c = createCipheriv("aes-256-cbc", key, iv);
    const cipher = Buffer.concat([c.update("hidden words"), c.final()]);
    const r = createObjects([
      "secret,id=raw,data=plain",
      "secret,id=b64,data=aGVsbG8=,format=base64",
      `secret,id=f,file=${dir}/pw`,
      `secret,id=k,data=${key.toString("base64")},format=base64`,
      `secret,id=enc,keyid=k,iv=${iv.toString("base64")},format=base64,data=${
        cipher.toString("base64")
      }`,
    ]);
    const text = (id: string) => new TextDecoder().decode(r.secretBytes(id));
    assert.equal(text("raw"), "plain");
    assert.equal(text("b64"), "hello");
    assert.equal(text("f"), "from-file");
    assert.equal(text("enc"), "hidden words");
    assert.throws(
      () => r.add(`secret,id=e2,keyid=k,data=${cipher.toString("base64")},format=base64`),
      /IV is required to decrypt secret/,
    );
    assert.throws(
      () => r.add("secret,id=e3,keyid=raw,iv=AAAAAAAAAAAAAAAAAAAAAA==,data=x"),
      /Key should be 32 bytes in length/,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("authz: glob as GLib matches, rules in order, default policy", () => {
  assert.ok(globMatch("CN=*,O=Org", "CN=a,b,O=Org"));
  assert.ok(globMatch("C?=x", "CN=x"));
  assert.ok(!globMatch("CN=[ab]", "CN=a"));
  assert.ok(globMatch("*", ""));
  const rules = [
    { match: "CN=bad*", policy: "deny" as const, format: "glob" as const },
    { match: "CN=good", policy: "allow" as const, format: "exact" as const },
  ];
  assert.equal(listAllows(rules, "deny", "CN=good"), true);
  assert.equal(listAllows(rules, "allow", "CN=badguy"), false);
  assert.equal(listAllows(rules, "deny", "CN=other"), false);
  const r = createObjects([
    "authz-list,id=l,policy=allow,rules.0.match=CN=x*,rules.0.policy=deny,rules.0.format=glob",
    "authz-simple,id=s,identity=CN=me",
  ]);
  const list = r.get("l")!.value as Authorizer;
  assert.equal(list.isAllowed("CN=xyz"), false);
  assert.equal(list.isAllowed("CN=abc"), true);
  assert.equal((r.get("s")!.value as Authorizer).isAllowed("CN=me"), true);
  assert.equal((r.get("s")!.value as Authorizer).isAllowed("CN=you"), false);
});

Deno.test("authz-listfile: loads the JSON rules and re-reads a changed file", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const file = `${dir}/acl.json`;
    const write = (policy: string, rules: unknown[]) =>
      Deno.writeTextFileSync(file, JSON.stringify({ policy, rules }));
    write("deny", [{ match: "CN=a", policy: "allow" }]);
    const r = createObjects([`authz-listfile,id=f,filename=${file}`]);
    const authz = r.get("f")!.value as Authorizer;
    assert.equal(authz.isAllowed("CN=a"), true);
    assert.equal(authz.isAllowed("CN=b"), false);
    write("allow", [{ match: "CN=a*", policy: "deny", format: "glob" }, {
      match: "x",
      policy: "deny",
    }]);
    assert.equal(authz.isAllowed("CN=a"), false);
    assert.equal(authz.isAllowed("CN=b"), true);
    Deno.writeTextFileSync(file, "[1]");
    assert.equal(authz.isAllowed("CN=b"), false, "a file that does not load denies");
    assert.throws(
      () => createObjects([`authz-listfile,id=g,filename=${dir}/none.json`]),
      /Unable to read/,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
