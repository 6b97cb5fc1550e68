/**
 * The parsed command line: a frozen object the rest of denbd reads. Field names follow qemu-nbd's
 * long options. Produced by `parseCommandLine` in `parse.ts`.
 *
 * @module
 */

import type { ObjectRegistry } from "../objects/registry.ts";

export type CacheMode = "none" | "writeback" | "writethrough" | "directsync" | "unsafe";
/**
 * --aio MODE; "auto" when --aio is not given (io_uring where the kernel allows it, else threads).
 * "native" is Linux AIO, which needs --cache=none or directsync.
 */
export type AioMode = "threads" | "native" | "io_uring" | "auto";
export type DiscardMode = "ignore" | "unmap";
export type DetectZeroesMode = "off" | "on" | "unmap";
/** Image formats by qemu's driver names (those denbd opens: lib/block/formats.ts). */
export type ImageFormat =
  | "raw"
  | "qcow2"
  | "vdi"
  | "vmdk"
  | "vhdx"
  | "vpc"
  | "qed"
  | "luks"
  | "dmg"
  | "parallels"
  | "bochs"
  | "cloop"
  | "qcow";

/** `--image-opts` or the plain FILE argument, resolved. */
export interface ImageSpec {
  /** Path of the image file (FILE, or file.filename= / filename= with --image-opts). */
  readonly filename: string;
  /** Format from -f or driver=; undefined means probe it as qemu-nbd does. */
  readonly format: ImageFormat | undefined;
  /** Byte offset into the file (-o, or offset= for driver=raw). */
  readonly offset: number;
  /** Exported size in bytes (size= for driver=raw); undefined means the rest of the file. */
  readonly size: number | undefined;
  /** Every --image-opts key=value pair as given (dotted keys kept: "file.filename"). */
  readonly raw: Readonly<Record<string, string>>;
  /**
   * qemu's flat node options when the image is more than a plain file under raw/qcow2 (`json:`,
   * a protocol such as `nbd://` or `null-co://`, a filter driver): lib/block/open_node.ts opens
   * it. Undefined for the plain-file case, which `filename`/`format`/`offset`/`size` describe.
   * With it, `offset` is only -o's.
   */
  readonly node?: Readonly<Record<string, string>>;
  /** FILE as given on the command line (qemu-nbd names it in open errors). */
  readonly source?: string;
}

/** What main.ts is asked to do. */
export type Command =
  /** `exitCode`: 0 unless given (qemu-nbd's `-T ...,help` lists the keys and exits 1). */
  | { readonly kind: "help"; readonly text: string; readonly exitCode?: number }
  | { readonly kind: "version"; readonly text: string }
  /** `objects`: what --object created (TLS credentials, secrets, authorization). */
  | { readonly kind: "serve"; readonly options: ServerOptions; readonly objects: ObjectRegistry };

export interface ServerOptions {
  readonly image: ImageSpec;
  /** -b/--bind (default "0.0.0.0"). */
  readonly bind: string;
  /** -p/--port (default 10809). */
  readonly port: number;
  /** -k/--socket: unix socket path; when set, no TCP listener. */
  readonly socket: string | undefined;
  /** -r/--read-only. */
  readonly readOnly: boolean;
  /** -s/--snapshot. */
  readonly snapshot: boolean;
  /** -l/--load-snapshot (ID or name, or the snapshot.id=/snapshot.name= form, as given). */
  readonly loadSnapshot: string | undefined;
  /** -e/--shared (default 1; 0 = unlimited). */
  readonly shared: number;
  /** -t/--persistent. */
  readonly persistent: boolean;
  /** -x/--export-name (default ""). */
  readonly exportName: string;
  /** -D/--description. */
  readonly description: string | undefined;
  /** --cache (default writeback; -n means none). */
  readonly cache: CacheMode;
  /** --aio (default "auto": io_uring where available, else threads). */
  readonly aio: AioMode;
  /** --discard (default ignore). */
  readonly discard: DiscardMode;
  /** --detect-zeroes (default off). */
  readonly detectZeroes: DetectZeroesMode;
  /** -A/--allocation-depth. */
  readonly allocationDepth: boolean;
  /** -B/--bitmap, repeatable. */
  readonly bitmaps: readonly string[];
  /** --fork. */
  readonly fork: boolean;
  /** --pid-file. */
  readonly pidFile: string | undefined;
  /** -v/--verbose. */
  readonly verbose: boolean;
  /** --handshake-limit seconds (default 10; 0 = no limit). */
  readonly handshakeLimit: number;
  /**
   * --tls-creds, --tls-authz, --tls-hostname, and the --object texts (data-plane threads rebuild
   * the objects from them: GnuTLS credentials belong to a thread).
   */
  readonly tlsCreds: string | undefined;
  readonly tlsAuthz: string | undefined;
  readonly tlsHostname: string | undefined;
  readonly objects: readonly string[];
  /** -T/--trace arguments as given, repeatable (applied at server start by lib/trace). */
  readonly trace: readonly string[];
  /** --selinux-label (kept for "not supported yet"). */
  readonly selinuxLabel: string | undefined;
  /** -c/--connect DEV, -d/--disconnect, -L/--list: client modes. */
  readonly connect: string | undefined;
  /** --connections (denbd's): bind -c's device over netlink with this many sockets. */
  readonly connections: number | undefined;
  /** --dead-conn-timeout (denbd's): seconds the kernel waits for a dead connection. */
  readonly deadConnTimeout: number | undefined;
  /** FILE as given (or the --image-opts string): -v names it, -d reads it as the device. */
  readonly file: string | undefined;
  readonly disconnect: boolean;
  readonly list: boolean;
  /** Socket activation: how many listening sockets the launcher handed over (0: none). */
  readonly activation: number;
}
