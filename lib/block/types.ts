/**
 * The one interface every block layer implements: format drivers (raw, qcow2), filters (read-only,
 * offset, detect-zeroes, discard policy, ...) and the backend shim the protocol talks to.
 *
 * Offsets and lengths are byte counts as JS numbers (exact up to 2^53, far past any image size).
 * Flags are a small typed set, never NBD wire bits: the protocol layer translates once.
 *
 * Errors: a layer throws {@link BlockError} with an errno (EIO, ENOSPC, EPERM, EINVAL, ENOTSUP...);
 * the protocol maps it once to an NBD error number.
 *
 * @module
 */

/** Flags for a write-like request. Absent means false. */
export interface WriteFlags {
  /** Force unit access: the data must be on stable storage before the call resolves. */
  fua?: boolean;
}

/** Flags for WRITE_ZEROES. */
export interface ZeroFlags extends WriteFlags {
  /** The range must stay allocated: zero it without punching a hole. */
  noHole?: boolean;
  /** Fail with ENOTSUP at once unless zeroing is faster than writing zeroes. */
  fastZero?: boolean;
}

/** base:allocation bits, as NBD defines them (NBD_STATE_HOLE, NBD_STATE_ZERO). */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;
/** qemu:dirty-bitmap bit (NBD_STATE_DIRTY). */
export const STATE_DIRTY = 1;

/**
 * Collects extents for block status. Layers append `(length, flags)` runs in offset order; the
 * collector merges equal neighbours and stops accepting once it is full, so a driver loops
 * `while (!out.full && pos < end)`.
 */
export class ExtentList {
  /** Flat pairs: length0, flags0, length1, flags1, ... */
  readonly pairs: number[] = [];
  #total = 0;
  #max: number;
  #rejected = false;

  /** @param maxExtents at most this many extents are kept (1 for REQ_ONE) */
  constructor(maxExtents: number) {
    this.#max = maxExtents;
  }

  /** Bytes covered so far. */
  get total(): number {
    return this.#total;
  }

  /** Number of extents kept. */
  get count(): number {
    return this.pairs.length >> 1;
  }

  /**
   * True once a run could not be appended (the list holds its maximum and the run differed
   * from the last one). Until then a driver keeps going: runs equal to the last one still merge,
   * which is how qemu answers REQ_ONE with the longest first extent.
   */
  get full(): boolean {
    return this.#rejected;
  }

  /** Append a run; merges with the previous run when the flags match. Returns false when full. */
  add(length: number, flags: number): boolean {
    if (length <= 0) return true;
    const n = this.pairs.length;
    if (n > 0 && this.pairs[n - 1] === flags) {
      this.pairs[n - 2]! += length;
      this.#total += length;
      return true;
    }
    if (this.count >= this.#max) {
      this.#rejected = true;
      return false;
    }
    this.pairs.push(length, flags);
    this.#total += length;
    return true;
  }
}

/**
 * A persistent dirty bitmap a layer exposes for `qemu:dirty-bitmap:NAME` (qemu-nbd -B); qcow2's
 * implementation is `DirtyBitmap` in qcow2/bitmap.ts.
 */
export interface BlockBitmap {
  readonly name: string;
  /** Bytes per bit. */
  readonly granularity: number;
  /** The bitmap tracks writes (qcow2 `auto` flag). */
  readonly isEnabled: boolean;
  /** Found with in_use set at open: qemu calls it inconsistent and refuses to export it. */
  readonly inUse: boolean;
  /**
   * Dirty status of `[offset, offset+length)` appended to `out` (flags {@link STATE_DIRTY} or 0),
   * covering the whole range unless `out` fills up.
   */
  extents(offset: number, length: number, out: ExtentList): void;
}

/** What a layer can do; the protocol derives the advertised transmission flags from it. */
export interface Capabilities {
  /** Writes allowed (false: the export is read-only). */
  readonly writable: boolean;
  /** FLUSH has a meaning (false for layers with no cache to flush). */
  readonly flush: boolean;
  /** TRIM is accepted (it may still be a no-op under --discard=ignore). */
  readonly trim: boolean;
  /** WRITE_ZEROES is accepted. */
  readonly zero: boolean;
  /** WRITE_ZEROES with fastZero can be honoured (fails fast with ENOTSUP when it cannot). */
  readonly fastZero: boolean;
  /** Block status reflects real allocation (false: everything reports as data). */
  readonly extents: boolean;
  /** Smallest I/O unit the layer needs (1, or 512 for probed raw images and O_DIRECT). */
  readonly minBlock: number;
}

/** The block-device interface shared by drivers and filters. */
export interface BlockDevice {
  /** Size in bytes of what this layer exposes. */
  readonly size: number;
  readonly caps: Capabilities;
  /**
   * Fill `buf` with the bytes at `offset`. The range is inside `size`. Every byte of `buf` must
   * be written (zeroes included): buffers are reused and arrive with stale contents.
   */
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /** Write `buf` at `offset`. */
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Discard a range (a hint: the layer may do nothing). */
  trim(offset: number, length: number, flags: WriteFlags): Promise<void>;
  /** Make a range read back as zeroes. */
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  /** Prefetch hint; must not change what reads return. */
  cache(offset: number, length: number): Promise<void>;
  /** base:allocation status of `[offset, offset+length)`, appended to `out`. */
  extents(offset: number, length: number, out: ExtentList): Promise<void>;
  /**
   * qemu:allocation-depth of `[offset, offset+length)`: 0 unallocated in the whole chain, 1 this
   * image, 2 its backing file, ... Appended to `out` with the depth as the flags value. Absent on
   * layers with no backing chain (the protocol then reports depth 1 everywhere).
   */
  allocationDepth?(offset: number, length: number, out: ExtentList): Promise<void>;
  /**
   * The persistent dirty bitmap `name` for -B: looked up in this layer's image, then down its
   * backing chain (qemu's order). Absent on layers that cannot hold bitmaps.
   */
  dirtyBitmap?(name: string): BlockBitmap | undefined;
  /**
   * Where `[offset, offset+length)` lies unchanged in a host file, for zero-copy reads
   * (sendfile from the page cache), or undefined when the bytes must be read and copied. Bytes
   * past the end of that file read as zeroes.
   */
  fileRange?(offset: number, length: number): FileRange | undefined;
  /**
   * Where a plain write (no FUA) of `[offset, offset+length)` may go straight into a host file,
   * unchanged, with nothing else to do; undefined when it must take pwrite.
   */
  writeRange?(offset: number, length: number): FileRange | undefined;
  /** Release resources. Called once, after the last request. */
  close(): Promise<void>;
}

/** A run of bytes stored as-is in a host file (see BlockDevice.fileRange). */
export interface FileRange {
  readonly fd: number;
  readonly offset: number;
  /**
   * The whole run is known to be data (no hole), so a structured read may answer it as one data
   * chunk without asking for block status first. False means "not known", not "a hole".
   */
  readonly data: boolean;
}

// Defined below ffi/ and lib/io/, which throw them too (see lib/errors.ts).
export { BlockError, Errno } from "../errors.ts";

/**
 * Base class for filters: forwards everything to the next layer. A filter overrides only what it
 * changes (the shape of nbdkit's filters).
 */
export class Filter implements BlockDevice {
  protected readonly next: BlockDevice;
  constructor(next: BlockDevice) {
    this.next = next;
  }
  get size(): number {
    return this.next.size;
  }
  get caps(): Capabilities {
    return this.next.caps;
  }
  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.pread(buf, offset);
  }
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.next.pwrite(buf, offset, flags);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.next.trim(offset, length, flags);
  }
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset, length, flags);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }
  extents(offset: number, length: number, out: ExtentList): Promise<void> {
    return this.next.extents(offset, length, out);
  }
  /**
   * Forwarded only by filters that read through unchanged: one that overrides pread changes the
   * bytes (or their position) and must say itself where they lie, so it gets no zero-copy
   * unless it overrides this too.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    if (this.pread !== Filter.prototype.pread) return undefined;
    return this.next.fileRange?.(offset, length);
  }
  /** Forwarded only by filters that do not override pwrite (the same rule as fileRange). */
  writeRange(offset: number, length: number): FileRange | undefined {
    if (this.pwrite !== Filter.prototype.pwrite) return undefined;
    return this.next.writeRange?.(offset, length);
  }
  /** Forwarded; a layer below with no backing chain reports depth 1 everywhere. */
  allocationDepth(offset: number, length: number, out: ExtentList): Promise<void> {
    if (this.next.allocationDepth) return this.next.allocationDepth(offset, length, out);
    out.add(length, 1);
    return Promise.resolve();
  }
  /**
   * Forwarded. A filter that changes the guest view (offset, size) overrides this to return
   * undefined: qemu's lookup does not pass such a node.
   */
  dirtyBitmap(name: string): BlockBitmap | undefined {
    return this.next.dirtyBitmap?.(name);
  }
  close(): Promise<void> {
    return this.next.close();
  }
}
