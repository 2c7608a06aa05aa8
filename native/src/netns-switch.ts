import { closeSync, openSync } from 'node:fs';
import { createRequire } from 'node:module';

/**
 * Runs synchronous work with the calling thread inside another network namespace.
 *
 * setns(2) on a network namespace affects only the calling thread, and a child process
 * started by `spawn` inherits the namespace of the thread that forks it. So entering the
 * namespace, spawning `nft`/`ip` and writing /proc/sys/net (resolved per thread) synchronously,
 * then returning, configures a slot's namespace with one exec per tool instead of
 * `ip netns exec` (which also unshares a mount namespace and remounts /sys for every call).
 * Nothing awaits in between, so no other JavaScript runs while the thread is switched.
 */
const CLONE_NEWNET = 0x40000000;

type SetNs = (fd: number, nstype: number) => number;
type Errno = () => number;

let setnsFn: SetNs | undefined;
let errnoFn: Errno | undefined;

function load(): { setns: SetNs; errno: Errno } {
  if (!setnsFn || !errnoFn) {
    const require = createRequire(import.meta.url);
    const koffi = require('koffi') as {
      load(name: string): { func(signature: string): (...args: unknown[]) => unknown };
      errno(): number;
    };
    const libc = koffi.load('libc.so.6');
    const fn = libc.func('int setns(int fd, int nstype)');
    setnsFn = (fd, nstype) => fn(fd, nstype) as number;
    errnoFn = () => koffi.errno();
  }
  return { setns: setnsFn, errno: errnoFn };
}

export class NetnsSwitchFailed extends Error {
  readonly code = 'NETNS_SWITCH_FAILED';
  constructor(
    readonly target: string,
    readonly errno: number,
  ) {
    super(`setns into ${target} failed (errno ${errno})`);
    this.name = 'NetnsSwitchFailed';
  }
}

export class NetnsSwitch {
  /** The namespace this thread started in: every switch returns to it. */
  private readonly homeFd: number;

  constructor() {
    load();
    this.homeFd = openSync('/proc/thread-self/ns/net', 'r');
  }

  /** `nsPath` is a namespace file such as /run/netns/ns-5. */
  run<T>(nsPath: string, work: () => T): T {
    const { setns, errno } = load();
    const fd = openSync(nsPath, 'r');
    try {
      if (setns(fd, CLONE_NEWNET) !== 0) throw new NetnsSwitchFailed(nsPath, errno());
      try {
        return work();
      } finally {
        if (setns(this.homeFd, CLONE_NEWNET) !== 0) {
          // Staying in a slot's namespace would put every later socket of this process there.
          process.stderr.write(`net-agent: cannot return to the home network namespace (errno ${errno()})\n`);
          process.exit(70);
        }
      }
    } finally {
      closeSync(fd);
    }
  }

  close(): void {
    closeSync(this.homeFd);
  }
}
