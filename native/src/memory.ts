import koffi from 'koffi';
import { sbx } from './native-library.js';
import { check } from './syscall-error.js';

const sbxMmap = sbx.func('int64_t sbx_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off)');
const sbxMunmap = sbx.func('int64_t sbx_munmap(uint64_t addr, uint64_t len)');
const sbxMadvise = sbx.func('int64_t sbx_madvise(uint64_t addr, uint64_t len, int advice)');
const sbxMprotect = sbx.func('int64_t sbx_mprotect(uint64_t addr, uint64_t len, int prot)');
const sbxMemfdCreate = sbx.func('int64_t sbx_memfd_create(const char *name, unsigned int flags)');
const sbxCopyFrom = sbx.func('void sbx_copy_from_address(void *dst, uint64_t src, uint64_t len)');
const sbxCopyTo = sbx.func('void sbx_copy_to_address(uint64_t dst, const void *src, uint64_t len)');
const sbxFill = sbx.func('void sbx_fill_address(uint64_t dst, int byte, uint64_t len)');

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_POPULATE = 0x8000;
export const MAP_HUGETLB = 0x40000;
export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;
export const MADV_HUGEPAGE = 14;
export const MADV_NOHUGEPAGE = 15;
export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;
export const MFD_HUGETLB = 4;

/** Addresses are plain numbers: user-space addresses on x86-64 stay below 2^47. */
export function mmap(address: number, length: number, prot: number, flags: number, fd = -1, offset = 0): number {
  return check('mmap', sbxMmap(address, length, prot, flags, fd, offset), `length ${length}`);
}

export function munmap(address: number, length: number): void {
  check('munmap', sbxMunmap(address, length));
}

export function madvise(address: number, length: number, advice: number): void {
  check('madvise', sbxMadvise(address, length, advice));
}

export function mprotect(address: number, length: number, prot: number): void {
  check('mprotect', sbxMprotect(address, length, prot));
}

export function memfdCreate(name: string, flags = MFD_CLOEXEC): number {
  return check('memfd_create', sbxMemfdCreate(name, flags));
}

/** An anonymous private mapping (zero-filled, lazily allocated). */
export function mapAnonymous(length: number, prot = PROT_READ | PROT_WRITE, extraFlags = 0): number {
  return mmap(0, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | extraFlags, -1, 0);
}

/**
 * A Uint8Array over raw memory. Valid only while the mapping lives: keep the view's lifetime
 * inside the owner of the mapping. Touching a userfaultfd-registered page through it faults.
 */
export function memoryView(address: number, length: number): Uint8Array {
  return new Uint8Array(koffi.view(BigInt(address), length));
}

export function copyFromAddress(target: Uint8Array, address: number, length = target.length): void {
  if (length > target.length) throw new RangeError(`copy of ${length} bytes into ${target.length}`);
  sbxCopyFrom(target, address, length);
}

export function copyToAddress(address: number, source: Uint8Array, length = source.length): void {
  if (length > source.length) throw new RangeError(`copy of ${length} bytes from ${source.length}`);
  sbxCopyTo(address, source, length);
}

export function fillAddress(address: number, byte: number, length: number): void {
  sbxFill(address, byte, length);
}
