import { isIPv4, isIPv6 } from 'node:net';
import koffi from 'koffi';

/**
 * The few libc socket calls the batched UDP path needs, through koffi. Node's dgram sockets
 * cost one syscall and one JS callback per datagram in each direction and cannot set
 * SO_REUSEPORT on Node 20; recvmmsg/sendmmsg move up to a batch of datagrams per call.
 *
 * Struct layouts are those of LP64 Linux (x86_64 and aarch64 agree): msghdr is 56 bytes,
 * mmsghdr 64 (msghdr + msg_len + padding), iovec 16.
 */

export const MSGHDR_SIZE = 64;
export const IOVEC_SIZE = 16;
/** sockaddr_in6 (28 bytes) rounded up. */
export const SOCKADDR_SIZE = 32;

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_REUSEPORT = 15;
const SO_RCVBUF = 8;
const SO_RCVBUFFORCE = 33;
const SO_RCVTIMEO = 20;
const IPPROTO_IPV6 = 41;
const IPV6_V6ONLY = 26;
const SHUT_RDWR = 2;
export const MSG_WAITFORONE = 0x10000;
export const EAGAIN = 11;
export const EINTR = 4;

/** A libc socket call failed; `errno` is the kernel's answer. */
export class UdpSocketError extends Error {
  readonly code = 'DNS_UDP_SOCKET';
  constructor(
    readonly call: string,
    readonly errno: number,
    readonly address: string,
  ) {
    super(`${call} on udp ${address} failed: errno ${errno}${errno === 98 ? ' (address in use)' : ''}`);
    this.name = 'UdpSocketError';
  }
}

export type NativePointer = unknown;

interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  setsockopt(fd: number, level: number, name: number, value: Buffer, length: number): number;
  bind(fd: number, address: Buffer, length: number): number;
  getsockname(fd: number, address: Buffer, length: Buffer): number;
  shutdown(fd: number, how: number): number;
  close(fd: number): number;
  recvmmsg: ((fd: number, vec: NativePointer, vlen: number, flags: number, timeout: null) => number) & {
    async(
      fd: number,
      vec: NativePointer,
      vlen: number,
      flags: number,
      timeout: null,
      done: (err: unknown, n: number) => void,
    ): void;
  };
  sendmmsg(fd: number, vec: NativePointer, vlen: number, flags: number): number;
}

let libc: Libc | null | undefined;

/** The bindings, or null where they cannot work (not LP64 Linux, or libc not loadable). */
export function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  if (process.platform !== 'linux' || (process.arch !== 'x64' && process.arch !== 'arm64')) return libc;
  try {
    const lib = koffi.load('libc.so.6');
    libc = {
      socket: lib.func('int socket(int, int, int)'),
      setsockopt: lib.func('int setsockopt(int, int, int, void *, uint32_t)'),
      bind: lib.func('int bind(int, void *, uint32_t)'),
      getsockname: lib.func('int getsockname(int, void *, void *)'),
      shutdown: lib.func('int shutdown(int, int)'),
      close: lib.func('int close(int)'),
      recvmmsg: lib.func('int recvmmsg(int, void *, unsigned int, int, void *)'),
      sendmmsg: lib.func('int sendmmsg(int, void *, unsigned int, int)'),
    } as Libc;
  } catch {
    libc = null;
  }
  return libc;
}

/** Native memory that JS reads and writes through a Buffer and C sees at `address`. */
export interface NativeBlock {
  readonly pointer: NativePointer;
  readonly address: bigint;
  readonly bytes: Buffer;
  free(): void;
}

export function allocNative(length: number): NativeBlock {
  const pointer = koffi.alloc('uint8_t', length);
  const bytes = Buffer.from(koffi.view(pointer, length));
  bytes.fill(0);
  let freed = false;
  return {
    pointer,
    address: koffi.address(pointer),
    bytes,
    free() {
      if (!freed) koffi.free(pointer);
      freed = true;
    },
  };
}

export function encodeSockaddr(host: string, port: number): Buffer {
  if (isIPv4(host)) {
    const out = Buffer.alloc(16);
    out.writeUInt16LE(AF_INET, 0);
    out.writeUInt16BE(port, 2);
    out.set(host.split('.').map(Number), 4);
    return out;
  }
  if (!isIPv6(host)) throw new RangeError(`not an IP address: ${host}`);
  const out = Buffer.alloc(28);
  out.writeUInt16LE(AF_INET6, 0);
  out.writeUInt16BE(port, 2);
  ipv6Bytes(host).copy(out, 8);
  return out;
}

function ipv6Bytes(host: string): Buffer {
  const [head = '', tail = ''] = host.includes('::') ? host.split('::') : [host, ''];
  const parse = (part: string) => (part ? part.split(':') : []);
  const left = parse(head);
  const right = parse(tail);
  const groups = [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}

/**
 * Opens a UDP socket bound to host:port with SO_REUSEPORT (so several sockets of this process
 * share the port and the kernel spreads datagrams over them) and a receive timeout, so a blocked
 * receive returns now and then and a stop never waits long.
 */
export function openUdpSocket(
  lib: Libc,
  host: string,
  port: number,
  options: { reusePort: boolean; receiveTimeoutMs: number; receiveBufferBytes: number },
): number {
  const address = `${host}:${port}`;
  const v6 = isIPv6(host);
  const fd = lib.socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new UdpSocketError('socket', koffi.errno(), address);
  const fail = (call: string): never => {
    const errno = koffi.errno();
    lib.close(fd);
    throw new UdpSocketError(call, errno, address);
  };
  const int = (value: number) => {
    const b = Buffer.alloc(4);
    b.writeInt32LE(value);
    return b;
  };
  if (options.reusePort && lib.setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, int(1), 4) < 0)
    fail('setsockopt(SO_REUSEPORT)');
  if (v6 && lib.setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, int(1), 4) < 0) fail('setsockopt(IPV6_V6ONLY)');
  // Best effort: a bigger queue absorbs bursts between batches. SO_RCVBUFFORCE (root) passes
  // net.core.rmem_max (208 KiB by default, about 256 queued queries); SO_RCVBUF is capped by it.
  const size = int(options.receiveBufferBytes);
  if (lib.setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, size, 4) < 0) lib.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, size, 4);
  const timeval = Buffer.alloc(16);
  timeval.writeBigInt64LE(BigInt(Math.floor(options.receiveTimeoutMs / 1000)), 0);
  timeval.writeBigInt64LE(BigInt((options.receiveTimeoutMs % 1000) * 1000), 8);
  if (lib.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, timeval, 16) < 0) fail('setsockopt(SO_RCVTIMEO)');
  const sockaddr = encodeSockaddr(host, port);
  if (lib.bind(fd, sockaddr, sockaddr.length) < 0) fail('bind');
  return fd;
}

export function boundPort(lib: Libc, fd: number): number {
  const sockaddr = Buffer.alloc(SOCKADDR_SIZE);
  const length = Buffer.alloc(4);
  length.writeUInt32LE(SOCKADDR_SIZE);
  if (lib.getsockname(fd, sockaddr, length) < 0) throw new UdpSocketError('getsockname', koffi.errno(), `fd ${fd}`);
  return sockaddr.readUInt16BE(2);
}

/** Wakes a receive blocked on `fd` (Linux returns from recvmmsg on a shut-down UDP socket). */
export function shutdownSocket(lib: Libc, fd: number): void {
  lib.shutdown(fd, SHUT_RDWR);
}

export type { Libc };
