import { sbx } from './native-library.js';
import { check } from './syscall-error.js';

const sbxLseek = sbx.func('int64_t sbx_lseek(int fd, int64_t off, int whence)');

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
const ENXIO = 6;

/**
 * Byte ranges of a file that hold data, by lseek(SEEK_DATA / SEEK_HOLE): what was written to
 * a sparse file (Firecracker's Diff snapshot writes each dirty page at its offset and leaves
 * the rest a hole). A filesystem without hole support reports the whole file as data, which
 * over-approximates and is never wrong. Sorted, non-overlapping, block-aligned by the filesystem.
 */
export function dataExtents(fd: number): { start: number; end: number }[] {
  const extents: { start: number; end: number }[] = [];
  let at = 0;
  for (;;) {
    const start = Number(sbxLseek(fd, at, SEEK_DATA));
    if (start === -ENXIO) break;
    check('lseek SEEK_DATA', start, `fd ${fd} offset ${at}`);
    const end = check('lseek SEEK_HOLE', Number(sbxLseek(fd, start, SEEK_HOLE)), `fd ${fd} offset ${start}`);
    extents.push({ start, end });
    at = end;
  }
  return extents;
}
