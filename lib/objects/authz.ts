/**
 * The authorization objects `--tls-authz` names: authz-simple (one identity), authz-list (rules
 * matched in order, exact or glob, then a default policy) and authz-listfile (the same rules in
 * a JSON file, re-read when it changes if refresh is on). Their value is an Authorizer the TLS
 * handshake asks with the client certificate's distinguished name.
 *
 * qemu-nbd 7.2 cannot create authz-listfile (its QOM type is named authz-list-file, so the
 * QAPI name is an "invalid object type"); denbd creates it as its QAPI schema describes.
 *
 * @module
 */

import type { Authorizer } from "../tls/server_tls.ts";
import { ObjectError, type ObjectType, type PropSpec, type PropValue } from "./types.ts";

/** One authz-list rule. */
export interface AuthzRule {
  readonly match: string;
  readonly policy: "allow" | "deny";
  readonly format: "exact" | "glob";
}

/** GLib's g_pattern_match_simple: `*` any run, `?` any one character, nothing else special. */
export function globMatch(pattern: string, text: string): boolean {
  const p = [...pattern];
  const t = [...text];
  let pi = 0;
  let ti = 0;
  let star = -1;
  let mark = 0;
  while (ti < t.length) {
    if (pi < p.length && (p[pi] === "?" || (p[pi] !== "*" && p[pi] === t[ti]))) {
      pi++;
      ti++;
    } else if (pi < p.length && p[pi] === "*") {
      star = pi++;
      mark = ti;
    } else if (star >= 0) {
      pi = star + 1;
      ti = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === "*") pi++;
  return pi === p.length;
}

/** Rules first, in order, then the default policy. */
export function listAllows(
  rules: readonly AuthzRule[],
  policy: "allow" | "deny",
  identity: string,
): boolean {
  for (const r of rules) {
    const hit = r.format === "glob" ? globMatch(r.match, identity) : r.match === identity;
    if (hit) return r.policy === "allow";
  }
  return policy === "allow";
}

const POLICY: PropSpec = { kind: "enum", values: ["deny", "allow"], typeName: "QAuthZListPolicy" };
const RULE: Readonly<Record<string, PropSpec>> = {
  match: { kind: "string", required: true },
  policy: { ...POLICY, required: true },
  format: { kind: "enum", values: ["exact", "glob"], typeName: "QAuthZListFormat" },
};

function toRules(v: PropValue | undefined): AuthzRule[] {
  if (!Array.isArray(v)) return [];
  return v.map((r) => ({
    match: r.match as string,
    policy: r.policy as "allow" | "deny",
    format: (r.format as "exact" | "glob" | undefined) ?? "exact",
  }));
}

export const AUTHZ_SIMPLE: ObjectType = {
  name: "authz-simple",
  parents: ["authz"],
  props: { identity: { kind: "string", required: true } },
  create(_id, values): Authorizer {
    const identity = values.identity as string;
    return { isAllowed: (who) => who === identity };
  },
};

export const AUTHZ_LIST: ObjectType = {
  name: "authz-list",
  parents: ["authz"],
  props: { policy: POLICY, rules: { kind: "list", item: RULE } },
  create(_id, values): Authorizer {
    const rules = toRules(values.rules);
    const policy = (values.policy as "allow" | "deny" | undefined) ?? "deny";
    return { isAllowed: (who) => listAllows(rules, policy, who) };
  },
};

interface ListFile {
  readonly rules: AuthzRule[];
  readonly policy: "allow" | "deny";
}

/** The JSON of an authz-listfile: {"policy": ..., "rules": [{"match", "policy", "format"}]}. */
function loadListFile(file: string): ListFile {
  let text: string;
  try {
    text = Deno.readTextFileSync(file);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "No such file or directory" : String(e);
    throw new ObjectError(`Unable to read '${file}': Failed to open file “${file}”: ${why}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ObjectError(`JSON parse error, ${e instanceof Error ? e.message : e}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ObjectError(`File '${file}' must contain a JSON object`);
  }
  const o = json as Record<string, unknown>;
  const policy = o.policy ?? "deny";
  if (policy !== "allow" && policy !== "deny") {
    throw new ObjectError(`Parameter 'policy' does not accept value '${String(policy)}'`);
  }
  const rules: AuthzRule[] = [];
  const list = o.rules ?? [];
  if (!Array.isArray(list)) {
    throw new ObjectError("Invalid parameter type for 'rules', expected: array");
  }
  list.forEach((r: unknown, i) => {
    const rule = (typeof r === "object" && r !== null ? r : {}) as Record<string, unknown>;
    if (typeof rule.match !== "string") {
      throw new ObjectError(`Parameter 'rules[${i}].match' is missing`);
    }
    if (rule.policy !== "allow" && rule.policy !== "deny") {
      throw new ObjectError(`Parameter 'rules[${i}].policy' is missing`);
    }
    const format = rule.format ?? "exact";
    if (format !== "exact" && format !== "glob") {
      throw new ObjectError(
        `Parameter 'rules[${i}].format' does not accept value '${String(format)}'`,
      );
    }
    rules.push({ match: rule.match, policy: rule.policy, format });
  });
  return { rules, policy };
}

export const AUTHZ_LISTFILE: ObjectType = {
  name: "authz-listfile",
  parents: ["authz"],
  props: { filename: { kind: "string", required: true }, refresh: { kind: "bool" } },
  create(_id, values): Authorizer {
    const file = values.filename as string;
    let list: ListFile | undefined = loadListFile(file);
    if (values.refresh === false) {
      return { isAllowed: (who) => listAllows(list!.rules, list!.policy, who) };
    }
    if (!file.startsWith("/")) throw new ObjectError("Filename must be an absolute path");
    if (file.endsWith("/")) throw new ObjectError("Path has no trailing filename component");
    // Re-read when the file changed (checked at each use: a handshake, not a hot path). A file
    // that no longer loads denies everyone until it loads again, as qemu's list does.
    let stamp = fileStamp(file);
    return {
      isAllowed(who) {
        const now = fileStamp(file);
        if (now !== stamp) {
          stamp = now;
          try {
            list = loadListFile(file);
          } catch (e) {
            list = undefined;
            console.error(`${e instanceof Error ? e.message : e}`);
          }
        }
        return list !== undefined && listAllows(list.rules, list.policy, who);
      },
    };
  },
};

function fileStamp(file: string): string {
  try {
    const st = Deno.statSync(file);
    return `${st.mtime?.getTime()}:${st.size}:${st.ino}`;
  } catch {
    return "missing";
  }
}
