/**
 * The `--object tls-creds-x509|psk|anon` types: qemu's property sets (tls-creds base: verify-peer,
 * dir, endpoint, priority; x509 adds sanity-check and passwordid; psk adds username) and the
 * credentials each creates (lib/tls/creds.ts loads the files when the object is created, as
 * qemu does, so a missing file is an error at start-up).
 *
 * @module
 */

import type { ObjectType, PropSpec, PropValues } from "../objects/types.ts";
import { loadTlsCredentials } from "./creds.ts";

/** Which side of a TLS connection the credentials are for. */
export type TlsEndpoint = "server" | "client";

/** What a tls-creds object's properties say (lib/tls/creds.ts loads what they name). */
export interface TlsCredsSpec {
  readonly kind: "x509" | "psk" | "anon";
  readonly id: string;
  readonly endpoint: TlsEndpoint;
  readonly dir: string | undefined;
  readonly verifyPeer: boolean;
  readonly priority: string | undefined;
  readonly sanityCheck: boolean;
  readonly passwordId: string | undefined;
  readonly username: string | undefined;
}

const BASE_PROPS: Readonly<Record<string, PropSpec>> = {
  "verify-peer": { kind: "bool" },
  dir: { kind: "string" },
  endpoint: { kind: "enum", values: ["server", "client"], typeName: "QCryptoTLSCredsEndpoint" },
  priority: { kind: "string" },
};

function spec(kind: TlsCredsSpec["kind"], id: string, v: PropValues): TlsCredsSpec {
  return {
    kind,
    id,
    endpoint: (v.endpoint as TlsEndpoint | undefined) ?? "client",
    dir: v.dir as string | undefined,
    verifyPeer: (v["verify-peer"] as boolean | undefined) ?? true,
    priority: v.priority as string | undefined,
    sanityCheck: (v["sanity-check"] as boolean | undefined) ?? true,
    passwordId: v.passwordid as string | undefined,
    username: v.username as string | undefined,
  };
}

function type(
  name: string,
  kind: TlsCredsSpec["kind"],
  extra: Readonly<Record<string, PropSpec>>,
): ObjectType {
  return {
    name,
    parents: ["tls-creds"],
    props: { ...BASE_PROPS, loaded: { kind: "readonly" }, ...extra },
    create(id, values, lookup) {
      return loadTlsCredentials(spec(kind, id, values), (sid) => lookup.secretBytes(sid));
    },
  };
}

/** The three creatable TLS credential types. */
export const TLS_OBJECT_TYPES: readonly ObjectType[] = [
  type("tls-creds-x509", "x509", {
    "sanity-check": { kind: "bool" },
    passwordid: { kind: "string" },
  }),
  type("tls-creds-psk", "psk", { username: { kind: "string" } }),
  type("tls-creds-anon", "anon", {}),
];
