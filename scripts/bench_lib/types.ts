/**
 * Shapes shared by the benchmark modules: what a server is, what a row is, and what one
 * measurement yields. Adding a server or a row means adding one entry to `servers.ts` or
 * `rows.ts`; nothing else needs to change.
 *
 * @module
 */

import type { BenchCredentials } from "./tls.ts";

/**
 * Images the benchmark can prepare:
 * - `raw`: a copy of the dense pseudo-random master;
 * - `qcow2`: the master converted to qcow2, so every cluster is allocated and holds data;
 * - `qcow2-compressed`: a compressible variant of the master, every cluster zlib-compressed;
 * - `qcow2-empty`: a fresh `qemu-img create -f qcow2` image with no cluster allocated. Writes
 *   change what such an image measures, so every measurement gets a new one (and a new server).
 *
 * Remote formats are served by an origin the benchmark starts once for all servers, which then
 * re-export it read-only (their NBD or HTTP client is what is measured):
 * - `nbd-raw`: the raw master exported by `qemu-nbd -t -e 0 -r -f raw` on a unix socket;
 * - `http-raw` / `http-qcow2`: the raw master / its qcow2 conversion served by nginx on loopback.
 *
 * Other image formats (issue 13) are the master converted with `qemu-img convert`, so every
 * block holds data: `vdi`, `vmdk` (monolithicSparse), `vhdx` (dynamic), and `luks` (LUKS1,
 * aes-256-xts-plain64, opened with the secret {@link LUKS_SECRET} through `--image-opts`).
 *
 * `rbd` is a Ceph cluster the benchmark starts (tests/interop/_ceph.ts: one monitor, one memstore
 * OSD on loopback) holding one copy of the master per server (`rbd import`), served as
 * `-f raw rbd:rbd/SERVER:conf=...`, read and written.
 *
 * TLS formats are a private raw copy served over TLS (see tls.ts), the clients connecting with
 * `nbds+unix://`: `tls-x509` (certificates, the client's verified) and `tls-psk` (a pre-shared key).
 */
export type ImageFormat =
  | "raw"
  | "qcow2"
  | "qcow2-compressed"
  | "qcow2-empty"
  | "nbd-raw"
  | "http-raw"
  | "http-qcow2"
  | "tls-x509"
  | "tls-psk"
  | "vdi"
  | "vmdk"
  | "vhdx"
  | "luks"
  | "rbd";

/** The passphrase of the benchmark's LUKS image. */
export const LUKS_SECRET = "denbd-bench";

/** Where a remote format's origin is: an NBD server, an HTTP server, or a Ceph cluster. */
export type RemoteKind = "nbd" | "http" | "rbd";

/** How a TLS format authenticates. */
export type TlsMode = "x509" | "psk";

/** What the tables and the runner need to know about an image format. */
export interface FormatInfo {
  /** How the format is named in row titles. */
  readonly label: string;
  /** Every measurement needs a fresh image (and server). */
  readonly freshPerRun: boolean;
  /** Set for formats read through an origin server instead of a private file. */
  readonly remote?: RemoteKind;
  /** Set for formats served over TLS. */
  readonly tls?: TlsMode;
}

/** How each image format is named in tables, and how it is prepared. */
export const FORMAT_INFO: Readonly<Record<ImageFormat, FormatInfo>> = {
  raw: { label: "raw", freshPerRun: false },
  qcow2: { label: "qcow2 (allocated)", freshPerRun: false },
  "qcow2-compressed": { label: "qcow2 (compressed)", freshPerRun: false },
  "qcow2-empty": { label: "qcow2 (empty)", freshPerRun: true },
  "nbd-raw": { label: "raw via NBD (qemu-nbd origin)", freshPerRun: false, remote: "nbd" },
  "http-raw": { label: "raw via HTTP (nginx)", freshPerRun: false, remote: "http" },
  "http-qcow2": { label: "qcow2 via HTTP (nginx)", freshPerRun: false, remote: "http" },
  "tls-x509": { label: "raw over TLS (x509)", freshPerRun: false, tls: "x509" },
  "tls-psk": { label: "raw over TLS (PSK)", freshPerRun: false, tls: "psk" },
  vdi: { label: "vdi (allocated)", freshPerRun: false },
  vmdk: { label: "vmdk (allocated)", freshPerRun: false },
  vhdx: { label: "vhdx (allocated)", freshPerRun: false },
  luks: { label: "luks (aes-xts)", freshPerRun: false },
  rbd: { label: "rbd (1 memstore OSD)", freshPerRun: false, remote: "rbd" },
};

/** The `-f` driver name that serves an image format. */
export function driverOf(format: ImageFormat): string {
  if (format === "vdi" || format === "vmdk" || format === "vhdx" || format === "luks") {
    return format;
  }
  return format === "raw" || format === "nbd-raw" || format === "http-raw" || format === "rbd" ||
      FORMAT_INFO[format].tls !== undefined
    ? "raw"
    : "qcow2";
}

/**
 * How qemu-nbd and denbd name a local image: `-f DRIVER FILE`, or for luks the secret object and
 * `--image-opts` (the key is an option of the format node).
 */
export function imageArgs(format: ImageFormat, image: string): string[] {
  if (format === "luks") {
    return [
      "--object",
      `secret,id=bench0,data=${LUKS_SECRET}`,
      "--image-opts",
      `driver=luks,key-secret=bench0,file.filename=${image}`,
    ];
  }
  return ["-f", driverOf(format), image];
}

/** Where a server instance runs and what it serves. */
export interface ServeTarget {
  /** Unix socket path the server must listen on (it must not exist yet). */
  readonly socket: string;
  /**
   * Image file, private to this server instance; for a remote format, the origin's URI or URL
   * (`nbd+unix:///?socket=PATH`, `http://127.0.0.1:PORT/disk.img`), shared by all servers;
   * for rbd, the server's own image in the cluster (`rbd:rbd/ID:conf=PATH`).
   */
  readonly image: string;
  /** Format of `image`. */
  readonly format: ImageFormat;
  /** For a TLS format: how, and the credentials. */
  readonly tls?: { readonly mode: TlsMode; readonly creds: BenchCredentials };
}

/** One NBD server under test. */
export interface ServerDef {
  /** Stable key used in JSON and on the command line (`--servers`). */
  readonly id: string;
  /** Column heading. */
  readonly label: string;
  /** Formats this server is benchmarked on; rows of other formats show "—". */
  readonly formats: readonly ImageFormat[];
  /** argv (program first) that serves `target` in the foreground until killed. */
  readonly argv: (target: ServeTarget) => string[];
  /** Why the server cannot run here (e.g. its entry file is missing), or undefined if it can. */
  readonly unavailable?: () => string | undefined;
  /** Only run when named in `--servers` (engine and cache-mode variants). */
  readonly extra?: boolean;
}

/** Everything a row needs to run its client once against one server. */
export interface RowContext {
  /** NBD URI of the server, e.g. `nbd+unix:///?socket=/tmp/x.sock`. */
  readonly uri: string;
  /** Size of the exported image in bytes. */
  readonly imageBytes: number;
  /** Local dense file of `imageBytes` bytes, used as the source of write rows. */
  readonly sourceFile: string;
  /** Seconds a time-based (fio) run lasts. */
  readonly runtimeSeconds: number;
}

/** What one client run measured. */
export interface Sample {
  /** The row's figure of merit, in the row's unit. */
  readonly value: number;
  /** Bytes moved across NBD (read + written), for CPU-per-GiB. */
  readonly bytes: number;
  /** Wall-clock seconds the client ran. */
  readonly seconds: number;
}

/** One benchmark row. */
export interface RowDef {
  /** Stable key used in JSON and on the command line (`--rows`). */
  readonly id: string;
  /** Row heading in the table. */
  readonly title: string;
  /** Format of the image the row runs on. */
  readonly format: ImageFormat;
  /** Unit of `Sample.value`; higher is better for every unit. */
  readonly unit: "MiB/s" | "IOPS";
  /** Part of the `--quick` smoke set when no `--rows` is given. */
  readonly quick: boolean;
  /** Rough wall-clock seconds of one client run, for the start-up estimate. */
  readonly estimateSeconds: (ctx: Omit<RowContext, "uri" | "sourceFile">) => number;
  /** Runs the client once; throws an Error with context when the client fails. */
  readonly run: (ctx: RowContext) => Promise<Sample>;
}
