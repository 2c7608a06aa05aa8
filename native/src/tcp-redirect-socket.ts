import { createRequire } from 'node:module';
import { SyscallError } from './syscall-error.js';

/**
 * The two socket calls a transparent TCP proxy needs that Node does not offer: a listening socket
 * made with plain syscalls (so, called inside NetnsSwitch.run, it belongs to another network
 * namespace; `net.Server.listen({ fd })` then serves it on the event loop), and the destination
 * a connection had before an nft `redirect` rewrote it (SO_ORIGINAL_DST, read from the conntrack
 * entry of the socket's own namespace).
 */
const AF_INET = 2;
const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const SOL_IP = 0;
const SO_ORIGINAL_DST = 80;

interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  setsockopt(fd: number, level: number, name: number, value: Buffer, len: number): number;
  bind(fd: number, addr: Buffer, len: number): number;
  listen(fd: number, backlog: number): number;
  getsockopt(fd: number, level: number, name: number, value: Buffer, len: Buffer): number;
  close(fd: number): number;
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
  const setsockopt = c.func('int setsockopt(int fd, int level, int name, const void *value, uint32_t len)');
  const bind = c.func('int bind(int fd, const void *addr, uint32_t len)');
  const listen = c.func('int listen(int fd, int backlog)');
  const getsockopt = c.func('int getsockopt(int fd, int level, int name, void *value, void *len)');
  const close = c.func('int close(int fd)');
  libc = {
    socket: (d, t, p) => socket(d, t, p) as number,
    setsockopt: (fd, level, name, value, len) => setsockopt(fd, level, name, value, len) as number,
    bind: (fd, addr, len) => bind(fd, addr, len) as number,
    listen: (fd, backlog) => listen(fd, backlog) as number,
    getsockopt: (fd, level, name, value, len) => getsockopt(fd, level, name, value, len) as number,
    close: (fd) => close(fd) as number,
    errno: () => koffi.errno(),
  };
  return libc;
}

function sockaddrIn(address: string, port: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt16LE(AF_INET, 0);
  b.writeUInt16BE(port, 2);
  const parts = address.split('.').map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255))
    throw new Error(`not an IPv4 address: ${address}`);
  parts.forEach((p, i) => b.writeUInt8(p, 4 + i));
  return b;
}

/**
 * A non-blocking IPv4 TCP socket listening on `address:port` in the calling thread's network
 * namespace; the caller owns the fd (hand it to `net.Server.listen({ fd })`).
 */
export function listenTcp4(address: string, port: number, backlog = 512): number {
  const c = load();
  const fd = c.socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new SyscallError('socket', c.errno());
  const fail = (syscall: string): never => {
    const err = new SyscallError(syscall, c.errno(), `${address}:${port}`);
    c.close(fd);
    throw err;
  };
  const one = Buffer.alloc(4);
  one.writeInt32LE(1, 0);
  if (c.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, one, 4) !== 0) fail('setsockopt');
  if (c.bind(fd, sockaddrIn(address, port), 16) !== 0) fail('bind');
  if (c.listen(fd, backlog) !== 0) fail('listen');
  return fd;
}

/** Where a redirected connection was going (SO_ORIGINAL_DST); ENOENT when it was not redirected. */
export function originalDestination(fd: number): { address: string; port: number } {
  const c = load();
  const addr = Buffer.alloc(16);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(16, 0);
  if (c.getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, addr, len) !== 0)
    throw new SyscallError('getsockopt(SO_ORIGINAL_DST)', c.errno(), `fd ${fd}`);
  return { address: [4, 5, 6, 7].map((i) => addr[i]).join('.'), port: addr.readUInt16BE(2) };
}
