import { sbx } from './native-library.js';
import { check } from './syscall-error.js';

const sbxClose = sbx.func('int64_t sbx_close(int fd)');
const sbxRead = sbx.func('int64_t sbx_read(int fd, void *buf, uint64_t len)');
const sbxWrite = sbx.func('int64_t sbx_write(int fd, const void *buf, uint64_t len)');
const sbxPread = sbx.func('int64_t sbx_pread(int fd, void *buf, uint64_t len, int64_t off)');
const sbxPwrite = sbx.func('int64_t sbx_pwrite(int fd, const void *buf, uint64_t len, int64_t off)');
const sbxPreadAddress = sbx.func('int64_t sbx_pread_address(int fd, uint64_t addr, uint64_t len, int64_t off)');
const sbxPwriteAddress = sbx.func('int64_t sbx_pwrite_address(int fd, uint64_t addr, uint64_t len, int64_t off)');
const sbxFtruncate = sbx.func('int64_t sbx_ftruncate(int fd, int64_t len)');
const sbxFcntl = sbx.func('int64_t sbx_fcntl(int fd, int cmd, int64_t arg)');
const sbxIoctl = sbx.func('int64_t sbx_ioctl(int fd, uint64_t request, void *arg)');
const sbxPoll = sbx.func('int64_t sbx_poll(const int32_t *fds_events, int32_t *revents, int n, int timeout_ms)');
const sbxEventfd = sbx.func('int64_t sbx_eventfd(unsigned int initval, int flags)');
const sbxPidfdOpen = sbx.func('int64_t sbx_pidfd_open(int pid, unsigned int flags)');
const sbxKill = sbx.func('int64_t sbx_kill(int pid, int sig)');

export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_GETFD = 1;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
export const POLLIN = 0x1;
export const POLLOUT = 0x4;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const POLLNVAL = 0x20;
export const POLLRDHUP = 0x2000;

export function close(fd: number): void {
  check('close', sbxClose(fd), `fd ${fd}`);
}

/** Reads up to `length` bytes into `buffer` at `offset`; returns the count (0 at EOF). */
export function read(fd: number, buffer: Uint8Array, offset = 0, length = buffer.length - offset): number {
  return check('read', sbxRead(fd, buffer.subarray(offset, offset + length), length));
}

export function write(fd: number, buffer: Uint8Array, offset = 0, length = buffer.length - offset): number {
  return check('write', sbxWrite(fd, buffer.subarray(offset, offset + length), length));
}

export function pread(fd: number, buffer: Uint8Array, position: number): number {
  return check('pread', sbxPread(fd, buffer, buffer.length, position));
}

export function pwrite(fd: number, buffer: Uint8Array, position: number): number {
  return check('pwrite', sbxPwrite(fd, buffer, buffer.length, position));
}

/** pread straight into a raw address (a mapping), without a JS buffer in between. */
export function preadToAddress(fd: number, address: number, length: number, position: number): number {
  return check('pread', sbxPreadAddress(fd, address, length, position));
}

export function pwriteFromAddress(fd: number, address: number, length: number, position: number): number {
  return check('pwrite', sbxPwriteAddress(fd, address, length, position));
}

export function ftruncate(fd: number, length: number): void {
  check('ftruncate', sbxFtruncate(fd, length));
}

export function fcntl(fd: number, cmd: number, arg = 0): number {
  return check('fcntl', sbxFcntl(fd, cmd, arg));
}

/** fcntl(2) F_DUPFD_CLOEXEC: a new descriptor for the same open file, close-on-exec (no child inherits it). */
const F_DUPFD_CLOEXEC = 1030;

/** A second descriptor for the open file under `fd` (the caller owns it), close-on-exec. */
export function dupCloexec(fd: number): number {
  return fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

export function setNonBlocking(fd: number, on = true): void {
  const flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

/** ioctl with a caller-owned argument buffer (the struct bytes); returns the ioctl's result. */
export function ioctl(fd: number, request: number | bigint, arg: Uint8Array | null): number {
  return check('ioctl', sbxIoctl(fd, request, arg));
}

export interface PollEntry {
  fd: number;
  events: number;
}

/** poll(2); returns revents per entry (blocking: use only off the main thread or with timeout 0). */
export function poll(entries: PollEntry[], timeoutMs: number): number[] {
  const fe = new Int32Array(entries.length * 2);
  entries.forEach((e, i) => {
    fe[2 * i] = e.fd;
    fe[2 * i + 1] = e.events;
  });
  const revents = new Int32Array(entries.length);
  check('poll', sbxPoll(fe, revents, entries.length, timeoutMs));
  return Array.from(revents);
}

export function eventfd(initval = 0, flags = EFD_CLOEXEC | EFD_NONBLOCK): number {
  return check('eventfd', sbxEventfd(initval, flags));
}

const one = new BigUint64Array([1n]);
/** Adds 1 to an eventfd's counter (wakes pollers). */
export function eventfdSignal(fd: number): void {
  check('write eventfd', sbxWrite(fd, one, 8));
}

/** A pidfd: readable once the process exits (how a dead peer is noticed). */
export function pidfdOpen(pid: number): number {
  return check('pidfd_open', sbxPidfdOpen(pid, 0), `pid ${pid}`);
}

export function kill(pid: number, signal: number): void {
  check('kill', sbxKill(pid, signal), `pid ${pid}`);
}
