import { closeSync, openSync } from 'node:fs';
import { createRequire } from 'node:module';
import { addAddress, addDefaultRoute, linkUp, parseAcks } from './rtnetlink-codec.js';
import { TypedError } from '#service-kit';

/**
 * Configures links inside the calling thread's network namespace with direct syscalls
 * (a tap through /dev/net/tun, then one rtnetlink batch), so a slot's namespace needs no `ip`
 * process. Must run synchronously inside NetnsSwitch.run: the netlink socket, the tun open and
 * if_nametoindex all bind to the thread's namespace at the moment they are made.
 */
const AF_NETLINK = 16;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0x80000;
const NETLINK_ROUTE = 0;
const TUNSETIFF = 0x400454ca;
const TUNSETPERSIST = 0x400454cb;
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const MSG_DONTWAIT = 0x40;

interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  send(fd: number, buf: Buffer, len: number, flags: number): number;
  recv(fd: number, buf: Buffer, len: number, flags: number): number;
  close(fd: number): number;
  ioctlPtr(fd: number, request: number, arg: Buffer): number;
  ioctlInt(fd: number, request: number, arg: number): number;
  ifNameToIndex(name: string): number;
  errno(): number;
}

let libc: Libc | undefined;

function load(): Libc {
  if (libc) return libc;
  const require = createRequire(import.meta.url);
  const koffi = require('koffi') as {
    load(name: string): { func(signature: string): (...args: unknown[]) => unknown };
    errno(): number;
  };
  const c = koffi.load('libc.so.6');
  const socket = c.func('int socket(int domain, int type, int protocol)');
  const send = c.func('long send(int fd, void *buf, size_t len, int flags)');
  const recv = c.func('long recv(int fd, void *buf, size_t len, int flags)');
  const close = c.func('int close(int fd)');
  const ioctl = c.func('int ioctl(int fd, unsigned long request, ...)');
  const ifNameToIndex = c.func('unsigned int if_nametoindex(const char *name)');
  libc = {
    socket: (d, t, p) => socket(d, t, p) as number,
    send: (fd, buf, len, flags) => Number(send(fd, buf, len, flags)),
    recv: (fd, buf, len, flags) => Number(recv(fd, buf, len, flags)),
    close: (fd) => close(fd) as number,
    ioctlPtr: (fd, req, arg) => ioctl(fd, req, 'void *', arg) as number,
    ioctlInt: (fd, req, arg) => ioctl(fd, req, 'long', arg) as number,
    ifNameToIndex: (name) => ifNameToIndex(name) as number,
    errno: () => koffi.errno(),
  };
  return libc;
}

export class NamespaceSetupFailed extends TypedError {
  readonly code = 'NAMESPACE_SETUP_FAILED';
  constructor(
    readonly step: string,
    readonly errno: number,
  ) {
    super(`${step} failed (errno ${errno})`);
  }
}

export interface NamespaceLinks {
  nsVeth: string;
  nsVethIp: string;
  hostVethIp: string;
  tapName: string;
  tapIp: string;
  tapPrefix: number;
}

/** A persistent tap (what `ip tuntap add mode tap` makes), in the calling thread's namespace. */
function createTap(c: Libc, name: string): void {
  const fd = openSync('/dev/net/tun', 'r+');
  try {
    const ifr = Buffer.alloc(40);
    ifr.write(name, 0, 15, 'latin1');
    ifr.writeUInt16LE(IFF_TAP | IFF_NO_PI, 16);
    if (c.ioctlPtr(fd, TUNSETIFF, ifr) !== 0) throw new NamespaceSetupFailed(`create tap ${name}`, c.errno());
    if (c.ioctlInt(fd, TUNSETPERSIST, 1) !== 0)
      throw new NamespaceSetupFailed(`make tap ${name} persistent`, c.errno());
  } finally {
    closeSync(fd);
  }
}

function index(c: Libc, name: string): number {
  const idx = c.ifNameToIndex(name);
  if (!idx) throw new NamespaceSetupFailed(`find link ${name}`, c.errno());
  return idx;
}

/** lo up, veth side addressed and up, tap created, addressed and up, default route via the host side. */
export function configureNamespaceLinks(links: NamespaceLinks): void {
  const c = load();
  createTap(c, links.tapName);
  const lo = index(c, 'lo');
  const veth = index(c, links.nsVeth);
  const tap = index(c, links.tapName);
  const steps = [
    'link set lo up',
    `link set ${links.nsVeth} up`,
    `addr add ${links.nsVethIp}/31 dev ${links.nsVeth}`,
    `link set ${links.tapName} up`,
    `addr add ${links.tapIp}/${links.tapPrefix} dev ${links.tapName}`,
    `route add default via ${links.hostVethIp}`,
  ];
  const batch = Buffer.concat([
    linkUp(1, lo),
    linkUp(2, veth),
    addAddress(3, veth, links.nsVethIp, 31),
    linkUp(4, tap),
    addAddress(5, tap, links.tapIp, links.tapPrefix),
    addDefaultRoute(6, links.hostVethIp, veth),
  ]);
  const fd = c.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) throw new NamespaceSetupFailed('open rtnetlink socket', c.errno());
  try {
    if (c.send(fd, batch, batch.length, 0) !== batch.length)
      throw new NamespaceSetupFailed('send rtnetlink batch', c.errno());
    // rtnetlink handles the whole batch inside send() and acks every request, so all acks are
    // queued by now: MSG_DONTWAIT turns a missing one into an error instead of a hang.
    const acked = new Set<number>();
    const buf = Buffer.alloc(16384);
    while (acked.size < steps.length) {
      const n = c.recv(fd, buf, buf.length, MSG_DONTWAIT);
      if (n <= 0) throw new NamespaceSetupFailed('read rtnetlink acks', c.errno());
      for (const ack of parseAcks(buf.subarray(0, n))) {
        if (ack.errno !== 0) throw new NamespaceSetupFailed(steps[ack.seq - 1] ?? `request ${ack.seq}`, ack.errno);
        acked.add(ack.seq);
      }
    }
  } finally {
    c.close(fd);
  }
}
