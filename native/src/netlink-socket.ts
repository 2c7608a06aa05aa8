import koffi from 'koffi';
import { SyscallError } from './syscall-error.js';
import { decodeNetlinkMessages, type NetlinkMessage } from './netlink-message.js';

const libc = koffi.load('libc.so.6');
const socketFn = libc.func('int socket(int domain, int type, int protocol)');
const bindFn = libc.func('int bind(int fd, const void *addr, uint32_t len)');
const sendtoFn = libc.func(
  'intptr_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t alen)',
);
const recvFn = libc.func('intptr_t recv(int fd, void *buf, size_t len, int flags)');
const setsockoptFn = libc.func('int setsockopt(int fd, int level, int name, const void *val, uint32_t len)');
const closeFn = libc.func('int close(int fd)');
const socketpairFn = libc.func('int socketpair(int domain, int type, int protocol, void *sv)');

const AF_UNIX = 1;
const AF_NETLINK = 16;
const SOCK_STREAM = 1;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0o2000000;
const NETLINK_GENERIC = 16;
const SOL_SOCKET = 1;
const SO_RCVTIMEO = 20;

function fail(syscall: string, detail?: string): never {
  throw new SyscallError(syscall, koffi.errno(), detail);
}

/** sockaddr_nl of the kernel (pid 0, no groups). */
function kernelAddress(): Buffer {
  const addr = Buffer.alloc(12);
  addr.writeUInt16LE(AF_NETLINK, 0);
  return addr;
}

/**
 * A NETLINK_GENERIC socket for request/response exchanges with the kernel. Calls block, with
 * a receive timeout so a kernel that never answers cannot hang the process; they are rare
 * control operations (attach, detach, status), not a data path.
 */
export class GenericNetlinkSocket {
  private fd: number;
  private seq = Math.floor(Math.random() * 0x7fffffff);

  constructor(receiveTimeoutMs = 5000) {
    const fd = Number(socketFn(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC));
    if (fd < 0) fail('socket', 'AF_NETLINK NETLINK_GENERIC');
    this.fd = fd;
    try {
      if (Number(bindFn(fd, kernelAddress(), 12)) < 0) fail('bind', 'netlink');
      const timeout = Buffer.alloc(16);
      timeout.writeBigInt64LE(BigInt(Math.floor(receiveTimeoutMs / 1000)), 0);
      timeout.writeBigInt64LE(BigInt((receiveTimeoutMs % 1000) * 1000), 8);
      if (Number(setsockoptFn(fd, SOL_SOCKET, SO_RCVTIMEO, timeout, 16)) < 0) fail('setsockopt', 'SO_RCVTIMEO');
    } catch (err) {
      closeFn(fd);
      throw err;
    }
  }

  nextSeq(): number {
    this.seq = (this.seq + 1) >>> 0;
    return this.seq;
  }

  /**
   * Sends one request and collects its replies until the kernel's ack (or error, thrown as a
   * SyscallError naming `what`).
   */
  exchange(request: Buffer, seq: number, what: string): NetlinkMessage[] {
    if (this.fd < 0) throw new Error('netlink socket closed');
    if (Number(sendtoFn(this.fd, request, request.length, 0, kernelAddress(), 12)) < 0) fail('sendto', what);
    const replies: NetlinkMessage[] = [];
    const buf = Buffer.alloc(64 * 1024);
    for (;;) {
      const n = Number(recvFn(this.fd, buf, buf.length, 0));
      if (n < 0) fail('recv', what);
      for (const message of decodeNetlinkMessages(buf.subarray(0, n))) {
        if (message.seq !== seq) continue;
        if (message.kind === 'error') throw new SyscallError(what, message.errno);
        if (message.kind === 'ack' || message.kind === 'done') return replies;
        replies.push(message);
      }
    }
  }

  close(): void {
    if (this.fd >= 0) closeFn(this.fd);
    this.fd = -1;
  }
}

/** A connected pair of AF_UNIX stream sockets (close-on-exec): one end for the kernel, one for us. */
export function unixSocketPair(): [number, number] {
  const fds = new Int32Array(2);
  if (Number(socketpairFn(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds)) < 0) fail('socketpair');
  return [fds[0]!, fds[1]!];
}

const SO_SNDBUF = 7;

/**
 * Raises a socket's send buffer (capped by net.core.wmem_max). A server answering 1 MiB
 * reads from one thread otherwise writes each reply in ~200 KiB pieces, one event-loop turn
 * apiece.
 */
export function setSendBufferSize(fd: number, bytes: number): void {
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes, 0);
  if (Number(setsockoptFn(fd, SOL_SOCKET, SO_SNDBUF, value, 4)) < 0) fail('setsockopt', 'SO_SNDBUF');
}
