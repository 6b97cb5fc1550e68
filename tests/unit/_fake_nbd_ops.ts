// A recording stand-in for the kernel's NBD ioctls (ffi/nbd_ioctl.ts's NbdDeviceOps): every call
// is logged by name, failures are injected per request, and NBD_DO_IT runs a caller's function
// (a fake kernel speaking NBD on the socket it was handed).
import {
  BLKROSET,
  NBD_CLEAR_QUE,
  NBD_CLEAR_SOCK,
  NBD_DISCONNECT,
  NBD_DO_IT,
  NBD_SET_BLKSIZE,
  NBD_SET_FLAGS,
  NBD_SET_SIZE_BLOCKS,
  NBD_SET_SOCK,
  NBD_SET_TIMEOUT,
  type NbdDeviceOps,
} from "../../ffi/nbd_ioctl.ts";

const NAMES = new Map<number, string>([
  [NBD_SET_SOCK, "SET_SOCK"],
  [NBD_SET_BLKSIZE, "SET_BLKSIZE"],
  [NBD_SET_SIZE_BLOCKS, "SET_SIZE_BLOCKS"],
  [NBD_SET_FLAGS, "SET_FLAGS"],
  [NBD_SET_TIMEOUT, "SET_TIMEOUT"],
  [NBD_DO_IT, "DO_IT"],
  [NBD_CLEAR_QUE, "CLEAR_QUE"],
  [NBD_CLEAR_SOCK, "CLEAR_SOCK"],
  [NBD_DISCONNECT, "DISCONNECT"],
  [BLKROSET, "BLKROSET"],
]);

export interface FakeOptions {
  /** open() result for a path: an errno to fail with (positive), else a descriptor is made. */
  readonly openErrno?: number;
  /** ioctl name → errno it fails with. */
  readonly fail?: Readonly<Record<string, number>>;
  /** What NBD_DO_IT does with the socket SET_SOCK got; its result is DO_IT's. */
  readonly kernel?: (sockFd: number) => Promise<number>;
}

export class FakeNbdOps implements NbdDeviceOps {
  /** Calls as "NAME arg" lines, in order. */
  readonly log: string[] = [];
  readonly #o: FakeOptions;
  #nextFd = 100;
  #sockFd = -1;
  readonly #open = new Set<number>();

  constructor(o: FakeOptions = {}) {
    this.#o = o;
  }

  /** Descriptors opened and not closed. */
  get openFds(): number[] {
    return [...this.#open];
  }

  open(path: string): number {
    this.log.push(`open ${path}`);
    if (this.#o.openErrno !== undefined) return -this.#o.openErrno;
    const fd = this.#nextFd++;
    this.#open.add(fd);
    return fd;
  }

  ioctl(fd: number, request: number, arg: number): number {
    const name = NAMES.get(request) ?? `0x${request.toString(16)}`;
    this.#check(fd);
    this.log.push(`${name} ${name === "SET_SOCK" ? "<socket>" : arg}`);
    if (name === "SET_SOCK") this.#sockFd = arg;
    const err = this.#o.fail?.[name];
    return err === undefined ? 0 : -err;
  }

  setReadOnly(fd: number, value: boolean): number {
    this.#check(fd);
    this.log.push(`BLKROSET ${value ? 1 : 0}`);
    const err = this.#o.fail?.["BLKROSET"];
    return err === undefined ? 0 : -err;
  }

  async doIt(fd: number): Promise<number> {
    this.#check(fd);
    this.log.push("DO_IT");
    const err = this.#o.fail?.["DO_IT"];
    if (err !== undefined) return -1;
    return this.#o.kernel ? await this.#o.kernel(this.#sockFd) : 0;
  }

  async rescan(path: string, reread?: boolean): Promise<void> {
    this.log.push(`rescan ${path}${reread ? " BLKRRPART" : ""}`);
    await Promise.resolve();
  }

  close(fd: number): void {
    this.#check(fd);
    this.log.push("close");
    this.#open.delete(fd);
  }

  #check(fd: number): void {
    if (!this.#open.has(fd)) throw new Error(`fake ops: descriptor ${fd} is not open`);
  }
}
