/**
 * Socket activation as qemu-nbd reads it (systemd's convention): when LISTEN_PID names this
 * process, LISTEN_FDS descriptors from 3 up are listening sockets handed over by the launcher
 * (systemd, or libnbd's `nbdinfo -- [ denbd ... ]`). Both variables are then removed so that
 * children do not take them for theirs.
 *
 * @module
 */

/** The first inherited descriptor (SD_LISTEN_FDS_START). */
export const FIRST_ACTIVATION_FD = 3;

/** How many sockets were handed to this process: 0 when none (or not to us). */
export function socketActivation(
  env: { get(name: string): string | undefined; delete(name: string): void } = Deno.env,
  pid: number = Deno.pid,
): number {
  const pidText = env.get("LISTEN_PID");
  if (pidText === undefined || !/^\d+$/.test(pidText.trim()) || Number(pidText) !== pid) return 0;
  const fdsText = env.get("LISTEN_FDS");
  if (fdsText === undefined || !/^\d+$/.test(fdsText.trim())) return 0;
  env.delete("LISTEN_FDS");
  env.delete("LISTEN_PID");
  return Number(fdsText);
}

/**
 * qemu-nbd's refusals of options that name another socket under socket activation, in its
 * order; undefined when the options agree with it.
 */
export function activationConflict(given: {
  readonly device: boolean;
  readonly socket: boolean;
  readonly bind: boolean;
  readonly port: boolean;
}): string | undefined {
  if (given.device) return "NBD device can't be set when using socket activation";
  if (given.socket) return "Unix socket can't be set when using socket activation";
  if (given.bind) return "The interface can't be set when using socket activation";
  if (given.port) return "TCP port number can't be set when using socket activation";
  return undefined;
}
