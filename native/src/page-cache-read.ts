import koffi from 'koffi';

/**
 * Reads only what the page cache already holds, synchronously: preadv2(2) with RWF_NOWAIT
 * (Linux 4.14) returns EAGAIN instead of waiting for the disk. A hot 4 KiB read then costs a
 * few microseconds on the calling thread instead of a libuv thread-pool round trip (about ten
 * times more), and a cold one still goes through the pool, so the event loop never waits on
 * the disk. A libc binding this small lives here rather than in native/: it is this data path's
 * optimisation and has a plain fallback.
 */
type Preadv2 = (
  fd: number,
  iov: { iov_base: Uint8Array; iov_len: number },
  iovcnt: number,
  offset: number,
  flags: number,
) => number;

const RWF_NOWAIT = 0x08;

const preadv2: Preadv2 | undefined = (() => {
  if (process.platform !== 'linux' || process.env.SBX_STORAGE_NO_NOWAIT_READ === '1') return undefined;
  try {
    const libc = koffi.load('libc.so.6');
    // Anonymous struct: no name in koffi's global type registry to collide with.
    const iovec = koffi.struct({ iov_base: 'void *', iov_len: 'size_t' });
    return libc.func('preadv2', 'long', ['int', koffi.pointer(iovec), 'int', 'long', 'int']) as Preadv2;
  } catch {
    return undefined;
  }
})();

/** Whether the fast path is available (Linux with preadv2 in libc). */
export const pageCacheReadAvailable = preadv2 !== undefined;

/**
 * Copies into `target[at, at + length)` the bytes at `position` that are in the page cache;
 * returns how many (0 when none are, or the fast path is unavailable). Never blocks on I/O.
 */
export function readFromPageCache(
  fd: number,
  target: Uint8Array,
  at: number,
  length: number,
  position: number,
): number {
  if (preadv2 === undefined || length === 0) return 0;
  const n = preadv2(fd, { iov_base: target.subarray(at, at + length), iov_len: length }, 1, position, RWF_NOWAIT);
  return n > 0 ? n : 0;
}
