/**
 * The TLS rows' credentials and arguments. One set of credentials (made with certtool when a TLS
 * row is selected, by the same code the TLS tests use) serves every server: qemu-nbd and denbd
 * read the directories through `--object tls-creds-x509|psk`, nbdkit through `--tls-certificates`
 * and `--tls-psk`. Every server verifies the client's certificate (qemu-nbd's default), so the
 * x509 rows do the same work on all of them.
 *
 * @module
 */

import { makeTlsFixture, removeTlsFixture, type TlsFixture } from "../../tests/interop/_tls.ts";
import type { ServeTarget } from "./types.ts";

export type { TlsFixture as BenchCredentials };

/** PSK user of the rows (its key is in the fixture's `psk1/keys.psk`). */
const PSK_USER = "psk1";

/** Makes the credentials (a temp dir; remove it with {@linkcode removeBenchCredentials}). */
export function makeBenchCredentials(): Promise<TlsFixture> {
  return makeTlsFixture();
}

/** Removes what {@linkcode makeBenchCredentials} made. */
export function removeBenchCredentials(c: TlsFixture): Promise<void> {
  return removeTlsFixture(c);
}

/** qemu-nbd's (and denbd's) options for the target's TLS, none for a plain target. */
export function qemuTlsArgs(t: ServeTarget): string[] {
  const tls = t.tls;
  if (tls === undefined) return [];
  const object = tls.mode === "x509"
    ? `tls-creds-x509,id=tls0,endpoint=server,dir=${tls.creds.server},verify-peer=on`
    : `tls-creds-psk,id=tls0,endpoint=server,dir=${tls.creds.psk1}`;
  return ["--object", object, "--tls-creds", "tls0"];
}

/** nbdkit's options for the target's TLS (TLS required, as qemu-nbd requires it). */
export function nbdkitTlsArgs(t: ServeTarget): string[] {
  const tls = t.tls;
  if (tls === undefined) return [];
  return tls.mode === "x509"
    ? ["--tls=require", `--tls-certificates=${tls.creds.server}`, "--tls-verify-peer"]
    : ["--tls=require", `--tls-psk=${tls.creds.psk1}/keys.psk`];
}

/** The URI the clients (nbdcopy, fio's libnbd) use for the target. */
export function clientUri(t: ServeTarget): string {
  const tls = t.tls;
  if (tls === undefined) return `nbd+unix:///?socket=${t.socket}`;
  return tls.mode === "x509"
    ? `nbds+unix:///?socket=${t.socket}&tls-certificates=${tls.creds.client1}`
    : `nbds+unix://${PSK_USER}@/?socket=${t.socket}&tls-psk-file=${tls.creds.psk1}/keys.psk`;
}
