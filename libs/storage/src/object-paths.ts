import { normalizeBuildId } from './build-id.js';

/** A build's data files (DESIGN.md §2), with E2B's names. */
export type BuildDataFile = 'memfile' | 'rootfs.ext4';
/** `memfile.prefetch` is optional: the recorded prefetch set (prefetch-codec.ts); older builds have none. */
export type BuildFileName = BuildDataFile | 'memfile.header' | 'rootfs.ext4.header' | 'memfile.prefetch' | 'snapfile';

export const BUILD_DATA_FILES: readonly BuildDataFile[] = ['memfile', 'rootfs.ext4'];
export const BUILD_FILE_NAMES: readonly BuildFileName[] = [
  'memfile',
  'memfile.header',
  'rootfs.ext4',
  'rootfs.ext4.header',
  'memfile.prefetch',
  'snapfile',
];
export const HEADER_SUFFIX = '.header';

/** `{buildId}/{file}` in the bucket or local directory. */
export function buildObjectPath(buildId: string, file: BuildFileName): string {
  return `${normalizeBuildId(buildId)}/${file}`;
}

export function headerFileName(file: BuildDataFile): BuildFileName {
  return `${file}${HEADER_SUFFIX}` as BuildFileName;
}

/**
 * Refuses object paths that could leave a local root or confuse a bucket listing: empty,
 * absolute, `.`/`..` segments, empty segments, NUL.
 */
export function checkObjectPath(objectPath: string): string {
  if (
    objectPath.length === 0 ||
    objectPath.length > 1024 ||
    objectPath.startsWith('/') ||
    objectPath.includes('\0') ||
    objectPath.split('/').some((s) => s === '' || s === '.' || s === '..')
  ) {
    throw new RangeError(`invalid object path: ${JSON.stringify(objectPath)}`);
  }
  return objectPath;
}
