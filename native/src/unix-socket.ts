import { sbx } from './native-library.js';
import { check, SyscallError } from './syscall-error.js';

const sbxSocket = sbx.func('int64_t sbx_unix_socket(int type)');
const sbxBindListen = sbx.func('int64_t sbx_unix_bind_listen(int fd, const char *path, int backlog)');
const sbxConnect = sbx.func('int64_t sbx_unix_connect(int fd, const char *path)');
const sbxAccept = sbx.func('int64_t sbx_accept(int fd, int flags)');
const sbxShutdown = sbx.func('int64_t sbx_shutdown(int fd, int how)');
const sbxPeerCred = sbx.func('int64_t sbx_peer_cred(int fd, int32_t *out)');
const sbxSendFds = sbx.func(
  'int64_t sbx_send_fds(int sock, const void *buf, uint64_t len, const int32_t *fds, int nfds, int flags)',
);
const sbxRecvFds = sbx.func(
  'int64_t sbx_recv_fds(int sock, void *buf, uint64_t len, int32_t *fds, int maxfds, int32_t *info, int flags)',
);
const sbxClose = sbx.func('int64_t sbx_close(int fd)');

export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_SEQPACKET = 5;
export const SOCK_NONBLOCK = 0o4000;
export const MSG_DONTWAIT = 0x40;
export const MSG_TRUNC = 0x20;
export const MSG_CTRUNC = 0x08;
export const SHUT_RDWR = 2;

/** A close-on-exec AF_UNIX socket. */
export function unixSocket(type = SOCK_STREAM): number {
  return check('socket', sbxSocket(type));
}

/** Binds (and listens unless backlog < 0) on a filesystem path. */
export function bindUnix(fd: number, path: string, backlog = 16): void {
  check('bind', sbxBindListen(fd, path, backlog), path);
}

export function connectUnix(fd: number, path: string): void {
  check('connect', sbxConnect(fd, path), path);
}

/** A listening socket at `path` (the caller removes a stale path first). */
export function listenUnix(
  path: string,
  options: { type?: number; backlog?: number; nonBlocking?: boolean } = {},
): number {
  const fd = unixSocket((options.type ?? SOCK_STREAM) | (options.nonBlocking ? SOCK_NONBLOCK : 0));
  try {
    bindUnix(fd, path, options.backlog ?? 16);
  } catch (err) {
    sbxClose(fd);
    throw err;
  }
  return fd;
}

export function dialUnix(path: string, type = SOCK_STREAM): number {
  const fd = unixSocket(type);
  try {
    connectUnix(fd, path);
  } catch (err) {
    sbxClose(fd);
    throw err;
  }
  return fd;
}

/** accept4; returns the new fd, or -1 when a non-blocking listener has nothing pending. */
export function accept(fd: number, nonBlocking = false): number {
  const r = Number(sbxAccept(fd, nonBlocking ? SOCK_NONBLOCK : 0));
  if (r === -11) return -1;
  return check('accept', r);
}

export function shutdown(fd: number, how = SHUT_RDWR): void {
  check('shutdown', sbxShutdown(fd, how));
}

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

export function peerCredentials(fd: number): PeerCredentials {
  const out = new Int32Array(3);
  check('getsockopt SO_PEERCRED', sbxPeerCred(fd, out));
  return { pid: out[0] ?? 0, uid: out[1] ?? 0, gid: out[2] ?? 0 };
}

/** Sends one message: `payload` plus `fds` as SCM_RIGHTS. Returns bytes sent. */
export function sendWithFds(sock: number, payload: Uint8Array, fds: number[] = [], flags = 0): number {
  return check('sendmsg', sbxSendFds(sock, payload, payload.length, Int32Array.from(fds), fds.length, flags));
}

export interface ReceivedMessage {
  /** The payload bytes (a view of the receive buffer). */
  payload: Uint8Array;
  /** Descriptors we kept (at most maxFds), close-on-exec. The caller owns them. */
  fds: number[];
  /** How many the peer sent; any beyond maxFds were closed on receipt. */
  fdsSent: number;
  /** The payload did not fit the buffer (MSG_TRUNC). */
  truncated: boolean;
  /** Control data was cut (MSG_CTRUNC): the peer sent more fds than fit. */
  controlTruncated: boolean;
}

/**
 * Receives one message with its descriptors. Returns null on a non-blocking socket with nothing
 * to read (EAGAIN); a payload of length 0 with no fds means the peer closed the connection.
 */
export function receiveWithFds(sock: number, maxPayload = 64 * 1024, maxFds = 8, flags = 0): ReceivedMessage | null {
  const buffer = new Uint8Array(maxPayload);
  const fds = new Int32Array(Math.max(1, maxFds));
  const info = new Int32Array(3);
  const r = Number(sbxRecvFds(sock, buffer, maxPayload, fds, maxFds, info, flags));
  if (r === -11) return null;
  if (r < 0) throw new SyscallError('recvmsg', -r);
  const stored = info[0] ?? 0;
  const msgFlags = info[2] ?? 0;
  return {
    payload: buffer.subarray(0, r),
    fds: Array.from(fds.subarray(0, stored)),
    fdsSent: info[1] ?? 0,
    truncated: (msgFlags & MSG_TRUNC) !== 0,
    controlTruncated: (msgFlags & MSG_CTRUNC) !== 0,
  };
}
