/**
 * The server's TLS: qemu-nbd's --tls-creds and --tls-authz turned into the session's STARTTLS
 * upgrade. The credentials are looked up once per thread; the authorization object is looked up
 * at each handshake, as qemu does (a missing one refuses that client, not the server).
 *
 * @module
 */

import type { ObjectLookup } from "../objects/types.ts";
import type { ByteConn } from "../nbd/conn_io.ts";
import type { TlsUpgrade } from "../nbd/session.ts";
import type { ReadinessLoop } from "../net/readiness.ts";
import { isTlsCredentials, type TlsCredentials } from "./creds.ts";
import { type FdStream, TlsConn, TlsError } from "./tls_conn.ts";

/** Decides whether a client certificate's DN may connect (the authz objects' value). */
export interface Authorizer {
  isAllowed(identity: string): boolean;
}

function isAuthorizer(v: unknown): v is Authorizer {
  return typeof v === "object" && v !== null &&
    typeof (v as { isAllowed?: unknown }).isAllowed === "function";
}

/** The loaded server credentials named by --tls-creds (the CLI checked id and endpoint). */
export function serverCredentials(objects: ObjectLookup, id: string): TlsCredentials {
  const value = objects.get(id)?.value;
  if (!isTlsCredentials(value)) throw new Error(`No TLS credentials with id '${id}'`);
  return value;
}

/** qemu's check of a client DN against the authorization object `id`. */
export function authorizeBy(objects: ObjectLookup, id: string): (dn: string) => void {
  return (dn) => {
    const obj = objects.get(id);
    if (obj === undefined) throw new TlsError(`Cannot find QAuthZ object ID ${id}`);
    if (!obj.classes.includes("authz") || !isAuthorizer(obj.value)) {
      throw new TlsError(`Object '${id}' is not a QAuthZ subclass`);
    }
    if (!obj.value.isAllowed(dn)) throw new TlsError(`TLS x509 authz check for ${dn} is denied`);
  };
}

function isFdStream(conn: ByteConn): conn is FdStream {
  return typeof (conn as { fd?: unknown }).fd === "number" && "closed" in conn;
}

/** The STARTTLS upgrade for sessions served over `loop`. */
export function serverTlsUpgrade(
  creds: TlsCredentials,
  objects: ObjectLookup,
  authzId: string | undefined,
  loop: ReadinessLoop,
): TlsUpgrade {
  const authorize = authzId === undefined ? undefined : authorizeBy(objects, authzId);
  return {
    async upgrade(conn: ByteConn): Promise<ByteConn> {
      if (!isFdStream(conn)) throw new TlsError("TLS needs a socket descriptor");
      return await TlsConn.start(conn, loop, "server", { creds, authorize });
    },
  };
}
