import { closeSync, openSync } from 'node:fs';
import koffi from 'koffi';
import { VmmFailure } from './api-error.js';

/**
 * The guest's network namespace, held only by an fd of this process (no /run/netns bind
 * mount): when the VMM dies, however it dies, the namespace and the veth end inside it go
 * away with it, and the kernel removes the veth's peer (`tap0`) in the slot namespace too.
 *
 * The namespace is made with unshare(CLONE_NEWNET) on the calling thread, which is moved back
 * at once with setns; `run` switches the calling thread in and out around synchronous work
 * (creating a listening socket), so sockets made there live in the guest's namespace while
 * the rest of the process, and guest memory, stay in the VMM.
 */
const CLONE_NEWNET = 0x40000000;

let libc: { unshare: (flags: number) => number; setns: (fd: number, type: number) => number } | undefined;

function bindings(): NonNullable<typeof libc> {
  if (!libc) {
    const lib = koffi.load('libc.so.6');
    libc = {
      unshare: lib.func('int unshare(int flags)') as (flags: number) => number,
      setns: lib.func('int setns(int fd, int nstype)') as (fd: number, type: number) => number,
    };
  }
  return libc;
}

export class GuestNetns {
  private closed = false;
  private constructor(
    readonly fd: number,
    private readonly homeFd: number,
  ) {}

  static create(): GuestNetns {
    const { unshare, setns } = bindings();
    const homeFd = openSync('/proc/thread-self/ns/net', 'r');
    if (unshare(CLONE_NEWNET) !== 0) {
      closeSync(homeFd);
      throw new VmmFailure('NETNS_CREATE', `unshare(CLONE_NEWNET) failed: errno ${koffi.errno()}`);
    }
    let guestFd: number;
    try {
      guestFd = openSync('/proc/thread-self/ns/net', 'r');
    } finally {
      if (setns(homeFd, CLONE_NEWNET) !== 0) {
        // The main thread is stranded in the new namespace: nothing after this is trustworthy.
        process.stderr.write(`vmm-sim: setns back to the slot namespace failed (errno ${koffi.errno()})\n`);
        process.exit(70);
      }
    }
    return new GuestNetns(guestFd, homeFd);
  }

  /**
   * How a child process reaches the namespace: spawn it with `fd` as its fd 3 and name
   * `CHILD_NETNS_PATH` (`ip ... netns <path>`, `nsenter --net=<path>`). /proc/self resolves in
   * any PID namespace; /proc/<our pid> would not when the VMM runs in its own (unshare -p).
   */
  static readonly CHILD_NETNS_PATH = '/proc/self/fd/3';

  /** Runs `fn` synchronously with the calling thread inside the guest namespace. */
  run<T>(fn: () => T): T {
    if (this.closed) throw new VmmFailure('NETNS_CLOSED', 'guest network namespace is closed');
    const { setns } = bindings();
    if (setns(this.fd, CLONE_NEWNET) !== 0) {
      throw new VmmFailure('NETNS_ENTER', `setns into the guest namespace failed: errno ${koffi.errno()}`);
    }
    try {
      return fn();
    } finally {
      if (setns(this.homeFd, CLONE_NEWNET) !== 0) {
        process.stderr.write(`vmm-sim: setns back to the slot namespace failed (errno ${koffi.errno()})\n`);
        process.exit(70);
      }
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
    closeSync(this.homeFd);
  }
}
