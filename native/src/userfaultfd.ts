import { readFileSync } from 'node:fs';
import { sbx } from './native-library.js';
import { close } from './fd.js';
import { check } from './syscall-error.js';

const sbxUserfaultfd = sbx.func('int64_t sbx_userfaultfd(int flags)');
const sbxUserfaultfdDev = sbx.func('int64_t sbx_userfaultfd_dev(int flags)');
const sbxApi = sbx.func('int64_t sbx_uffd_api(int fd, uint64_t features, uint64_t *out)');
const sbxRegister = sbx.func(
  'int64_t sbx_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)',
);
const sbxWriteProtect = sbx.func('int64_t sbx_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)');

/** UFFD_FEATURE_* bits (linux/userfaultfd.h, including ones newer than the installed header). */
export const UffdFeature = {
  PAGEFAULT_FLAG_WP: 1 << 0,
  EVENT_FORK: 1 << 1,
  EVENT_REMAP: 1 << 2,
  EVENT_REMOVE: 1 << 3,
  MISSING_HUGETLBFS: 1 << 4,
  MISSING_SHMEM: 1 << 5,
  EVENT_UNMAP: 1 << 6,
  SIGBUS: 1 << 7,
  THREAD_ID: 1 << 8,
  MINOR_HUGETLBFS: 1 << 9,
  MINOR_SHMEM: 1 << 10,
  EXACT_ADDRESS: 1 << 11,
  WP_HUGETLBFS_SHMEM: 1 << 12,
  WP_UNPOPULATED: 1 << 13,
  POISON: 1 << 14,
  WP_ASYNC: 1 << 15,
  MOVE: 1 << 16,
} as const;

export const UFFDIO_REGISTER_MODE_MISSING = 1;
export const UFFDIO_REGISTER_MODE_WP = 2;
export const UFFDIO_REGISTER_MODE_MINOR = 4;
export const UFFDIO_COPY_MODE_DONTWAKE = 1;
export const UFFDIO_COPY_MODE_WP = 2;
export const UFFDIO_WRITEPROTECT_MODE_WP = 1;
export const UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2;
export const UFFD_USER_MODE_ONLY = 1;

const O_CLOEXEC = 0o2000000;
const O_NONBLOCK = 0o4000;

/**
 * A new userfaultfd (close-on-exec, non-blocking by default). Falls back to /dev/userfaultfd
 * when the syscall is refused (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE).
 */
export function userfaultfd(flags = O_CLOEXEC | O_NONBLOCK): number {
  const r = Number(sbxUserfaultfd(flags));
  if (r >= 0) return r;
  const dev = Number(sbxUserfaultfdDev(flags));
  if (dev >= 0) return dev;
  return check('userfaultfd', r);
}

export interface UffdApi {
  /** Features granted (a subset of what was asked; the kernel refuses unknown ones). */
  features: number;
  /** Bit mask of the ioctls available on the fd. */
  ioctls: bigint;
}

const apiOut = new BigUint64Array(2);
/** The UFFDIO_API handshake; once per fd. Pass 0 to learn which features the kernel offers. */
export function uffdApi(fd: number, features: number): UffdApi {
  check('UFFDIO_API', sbxApi(fd, features, apiOut), `features 0x${features.toString(16)}`);
  return { features: Number(apiOut[0]), ioctls: apiOut[1] ?? 0n };
}

/** Features this kernel offers (probed on a throwaway uffd). */
export function kernelUffdFeatures(): number {
  const fd = userfaultfd();
  try {
    return uffdApi(fd, 0).features;
  } finally {
    close(fd);
  }
}

const ioctlsOut = new BigUint64Array(1);
/** Registers [start, start+length) with the given UFFDIO_REGISTER_MODE_* bits; returns range ioctls. */
export function uffdRegister(fd: number, start: number, length: number, mode: number): bigint {
  check('UFFDIO_REGISTER', sbxRegister(fd, start, length, mode, ioctlsOut), `0x${start.toString(16)}+${length}`);
  return ioctlsOut[0] ?? 0n;
}

/** Write-protects (protect=true) or unprotects a range; unprotecting wakes waiters unless dontWake. */
export function uffdWriteProtect(fd: number, start: number, length: number, protect: boolean, dontWake = false): void {
  const mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) | (dontWake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0);
  check('UFFDIO_WRITEPROTECT', sbxWriteProtect(fd, start, length, mode));
}

/**
 * Features negotiated on a uffd we received (its UFFDIO_API was done by the peer, and a second
 * UFFDIO_API is refused): the kernel shows them in /proc/self/fdinfo/<fd> as `API:<api>:<features>:<ioctls>`.
 */
export function uffdFeaturesOfFd(fd: number): number {
  const text = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const m = /^API:\s*([0-9a-f]+):([0-9a-f]+):([0-9a-f]+)/m.exec(text);
  if (!m?.[2]) throw new Error(`fd ${fd} is not a userfaultfd (no API line in fdinfo)`);
  return parseInt(m[2], 16);
}
