/**
 * `--object`: each argument checked as qemu 7.2's QAPI visitor checks ObjectOptions (qom-type,
 * id, then the type's members in order, then anything left over), then created and kept by id.
 * Objects are created in command-line order, so a secret must come before what uses it.
 *
 * @module
 */

import { parseKeyval } from "./keyval.ts";
import { type Secret, SECRET_TYPE } from "./secret.ts";
import { AUTHZ_LIST, AUTHZ_LISTFILE, AUTHZ_SIMPLE } from "./authz.ts";
import { TLS_OBJECT_TYPES } from "../tls/object_types.ts";
import {
  ObjectError,
  type ObjectLookup,
  type ObjectType,
  type PropSpec,
  type PropValue,
  type UserObject,
} from "./types.ts";

/** Every qom-type qemu 7.2's QAPI schema knows (others: "does not accept value"). */
const QAPI_TYPES: ReadonlySet<string> = new Set([
  "authz-list",
  "authz-listfile",
  "authz-pam",
  "authz-simple",
  "can-bus",
  "can-host-socketcan",
  "colo-compare",
  "cryptodev-backend",
  "cryptodev-backend-builtin",
  "cryptodev-backend-lkcf",
  "cryptodev-vhost-user",
  "dbus-vmstate",
  "filter-buffer",
  "filter-dump",
  "filter-mirror",
  "filter-redirector",
  "filter-replay",
  "filter-rewriter",
  "input-barrier",
  "input-linux",
  "iothread",
  "main-loop",
  "memory-backend-epc",
  "memory-backend-file",
  "memory-backend-memfd",
  "memory-backend-ram",
  "pef-guest",
  "pr-manager-helper",
  "qtest",
  "rng-builtin",
  "rng-egd",
  "rng-random",
  "secret",
  "secret_keyring",
  "sev-guest",
  "thread-context",
  "s390-pv-guest",
  "throttle-group",
  "tls-creds-anon",
  "tls-creds-psk",
  "tls-creds-x509",
  "tls-cipher-suites",
  "x-remote-object",
  "x-vfio-user-server",
]);

/** Types qemu-nbd 7.2 (Debian's build) has no QOM class for: "invalid object type". */
const NOT_BUILT = new Set(["authz-pam"]);

const TYPES: ReadonlyMap<string, ObjectType> = new Map(
  [SECRET_TYPE, AUTHZ_SIMPLE, AUTHZ_LIST, AUTHZ_LISTFILE, ...TLS_OBJECT_TYPES].map((t) => [
    t.name,
    t,
  ]),
);

/** An object error qemu prints with a second line. */
export class ObjectHintError extends ObjectError {
  readonly hint: string;
  constructor(message: string, hint: string) {
    super(message);
    this.hint = hint;
  }
}

/** What an `--object` argument asked for: an object was made, or help is to be printed. */
export type ObjectOutcome =
  | { readonly kind: "created"; readonly object: UserObject }
  | { readonly kind: "help"; readonly text: string };

const ID = /^[A-Za-z][A-Za-z0-9._-]*$/;

/** Raw member values: strings from keyval, typed values from JSON. */
type Raw = Map<string, unknown>;

export class ObjectRegistry implements ObjectLookup {
  readonly #objects = new Map<string, UserObject>();

  get(id: string): UserObject | undefined {
    return this.#objects.get(id);
  }

  secretBytes(id: string): Uint8Array {
    const o = this.#objects.get(id);
    if (o === undefined) throw new ObjectError(`No secret with id '${id}'`);
    if (o.type !== "secret") throw new ObjectError(`Object with id '${id}' is not a secret`);
    return (o.value as Secret).bytes;
  }

  /** Check and create the object one `--object` argument describes (throws ObjectError). */
  add(text: string): ObjectOutcome {
    let raw: Raw;
    if (text.startsWith("{")) {
      raw = fromJson(text);
    } else {
      const kv = parseKeyval(text, "qom-type");
      raw = new Map(kv.pairs);
      if (kv.help) return { kind: "help", text: helpText(raw.get("qom-type") as string) };
    }
    const typeName = raw.get("qom-type");
    raw.delete("qom-type");
    if (typeName === undefined) throw new ObjectError("Parameter 'qom-type' is missing");
    if (typeof typeName !== "string" || !QAPI_TYPES.has(typeName)) {
      throw new ObjectError(`Parameter 'qom-type' does not accept value '${String(typeName)}'`);
    }
    const id = raw.get("id");
    raw.delete("id");
    if (id === undefined) throw new ObjectError("Parameter 'id' is missing");
    if (typeof id !== "string" || !ID.test(id)) {
      throw new ObjectHintError(
        "Parameter 'id' expects an identifier",
        "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
      );
    }
    const type = TYPES.get(typeName);
    if (type === undefined) {
      if (NOT_BUILT.has(typeName)) throw new ObjectError(`invalid object type: ${typeName}`);
      throw new ObjectError(`object type '${typeName}' is not supported by denbd yet`);
    }
    const values = visitMembers(type.props, raw, "");
    const leftover = raw.keys().next();
    if (!leftover.done) throw new ObjectError(`Parameter '${leftover.value}' is unexpected`);
    for (const [name, spec] of Object.entries(type.props)) {
      if (spec.kind === "readonly" && values[name] !== undefined) {
        throw new ObjectError(`Property '${type.name}.${name}' is not writable`);
      }
    }
    if (this.#objects.has(id)) {
      throw new ObjectError(
        `attempt to add duplicate property '${id}' to object (type 'container')`,
      );
    }
    const object: UserObject = {
      type: type.name,
      id,
      classes: type.parents,
      value: type.create(id, values, this),
    };
    this.#objects.set(id, object);
    return { kind: "created", object };
  }
}

/** Build the objects of `texts` in order (data-plane threads rebuild the command line's). */
export function createObjects(texts: readonly string[]): ObjectRegistry {
  const r = new ObjectRegistry();
  for (const t of texts) r.add(t);
  return r;
}

function fromJson(text: string): Raw {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new ObjectError("JSON parse error, premature EOI");
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ObjectError("Invalid parameter type for 'obj', expected: object");
  }
  return new Map(Object.entries(json));
}

const BOOL_WORDS: Readonly<Record<string, boolean>> = {
  on: true,
  yes: true,
  true: true,
  y: true,
  off: false,
  no: false,
  false: false,
  n: false,
};

/** Visit `props` in order, taking their values out of `raw` (keyval names under `prefix`). */
function visitMembers(
  props: Readonly<Record<string, PropSpec>>,
  raw: Raw,
  prefix: string,
): Record<string, PropValue> {
  const out: Record<string, PropValue> = {};
  for (const [name, spec] of Object.entries(props)) {
    const key = prefix + name;
    if (spec.kind === "list") {
      const items = visitList(spec.item, raw, key);
      if (items !== undefined) out[name] = items;
      continue;
    }
    const v = raw.get(key);
    raw.delete(key);
    if (v === undefined) {
      if ("required" in spec && spec.required) {
        throw new ObjectError(`Parameter '${key}' is missing`);
      }
      continue;
    }
    out[name] = convert(spec, key, v);
  }
  return out;
}

function convert(spec: PropSpec, key: string, v: unknown): PropValue {
  switch (spec.kind) {
    case "bool": {
      if (typeof v === "boolean") return v;
      const b = typeof v === "string" ? BOOL_WORDS[v] : undefined;
      if (b === undefined) throw new ObjectError(`Parameter '${key}' expects 'on' or 'off'`);
      return b;
    }
    case "readonly":
      return typeof v === "boolean" ? v : String(v);
    case "enum":
      if (typeof v !== "string" || !spec.values.includes(v)) {
        throw new ObjectError(`Parameter '${key}' does not accept value '${String(v)}'`);
      }
      return v;
    case "string":
      if (typeof v !== "string") {
        throw new ObjectError(`Invalid parameter type for '${key}', expected: string`);
      }
      return v;
    case "list":
      throw new ObjectError(`Parameter '${key}' is unexpected`);
  }
}

/** `NAME.0.KEY=...`, `NAME.1.KEY=...` (keyval) or a JSON array: the list's items. */
function visitList(
  item: Readonly<Record<string, PropSpec>>,
  raw: Raw,
  name: string,
): Record<string, PropValue>[] | undefined {
  const json = raw.get(name);
  if (json !== undefined) {
    raw.delete(name);
    if (!Array.isArray(json)) {
      throw new ObjectError(`Invalid parameter type for '${name}', expected: array`);
    }
    return json.map((entry, i) => {
      const m: Raw = new Map(Object.entries(entry as Record<string, unknown>));
      const v = visitMembers(item, m, "");
      const extra = m.keys().next();
      if (!extra.done) {
        throw new ObjectError(`Parameter '${name}[${i}].${extra.value}' is unexpected`);
      }
      return v;
    });
  }
  const indexes = new Set<number>();
  for (const key of raw.keys()) {
    const m = new RegExp(`^${name.replace(/\./g, "\\.")}\\.(\\d+)\\.`).exec(key);
    if (m) indexes.add(Number(m[1]));
  }
  if (indexes.size === 0) return undefined;
  const items: Record<string, PropValue>[] = [];
  for (let i = 0; indexes.has(i); i++) items.push(visitMembers(item, raw, `${name}.${i}.`));
  return items;
}

/** `--object help` and `--object TYPE,help`, in qemu's layout. */
function helpText(type: string | undefined): string {
  if (type === undefined) {
    return "List of user creatable objects:\n" +
      [...TYPES.keys()].sort().map((t) => `  ${t}`).join("\n");
  }
  const t = TYPES.get(type);
  if (t === undefined) return `There are no options for ${type}.`;
  const lines = Object.entries(t.props)
    .filter(([, s]) => s.kind !== "readonly")
    .map(([n, s]) => `  ${n}=<${typeLabel(s)}>`)
    .sort();
  return `${type} options:\n${lines.join("\n")}`;
}

function typeLabel(s: PropSpec): string {
  switch (s.kind) {
    case "string":
      return "string";
    case "bool":
      return "bool";
    case "enum":
      return s.typeName;
    case "list":
      return "QAuthZListRuleList";
    case "readonly":
      return "bool";
  }
}
