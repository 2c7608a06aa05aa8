import { HandshakeInvalid } from './handshake-error.js';

/** One guest memory region as Firecracker describes it (DESIGN.md §4), in bytes. */
export interface GuestRegion {
  /** Host virtual address of the region in the VMM's address space. */
  base: number;
  size: number;
  /** Offset of the region's first byte in the memory file. */
  offset: number;
  pageSize: number;
}

export const PAGE_4K = 4096;
export const PAGE_2M = 2 * 1024 * 1024;
export const SUPPORTED_PAGE_SIZES: readonly number[] = [PAGE_4K, PAGE_2M];
export const MAX_REGIONS = 64;

export interface ValidateOptions {
  /** Size of the memory file (or source); regions must end within it. */
  memorySize?: number;
  /** When set, every region must use this page size. */
  pageSize?: number;
  /** When set, the page size must be a multiple of it (the memory file's header block size). */
  blockSize?: number;
}

/**
 * Checks what the server relies on: supported page sizes, non-empty page-aligned regions
 * (address, size, offset), no two regions overlapping in the VMM's address space or in the
 * memory file, all within the memory file. Throws HandshakeInvalid naming the region.
 */
export function validateRegions(regions: readonly GuestRegion[], options: ValidateOptions = {}): void {
  if (regions.length === 0) throw new HandshakeInvalid('NO_REGIONS', 'the region list is empty');
  if (regions.length > MAX_REGIONS)
    throw new HandshakeInvalid('TOO_MANY_REGIONS', `${regions.length} regions (at most ${MAX_REGIONS})`);
  regions.forEach((r, i) => {
    if (!SUPPORTED_PAGE_SIZES.includes(r.pageSize))
      throw new HandshakeInvalid('BAD_PAGE_SIZE', `region ${i}: page size ${r.pageSize} (want 4096 or 2097152)`, i);
    if (r.pageSize !== regions[0]!.pageSize)
      throw new HandshakeInvalid(
        'BAD_PAGE_SIZE',
        `region ${i}: page size ${r.pageSize}, region 0 uses ${regions[0]!.pageSize} (one page size per VM)`,
        i,
      );
    if (options.blockSize !== undefined && r.pageSize % options.blockSize !== 0)
      throw new HandshakeInvalid(
        'BAD_PAGE_SIZE',
        `region ${i}: page size ${r.pageSize} is not a multiple of the memory file's block size ${options.blockSize}`,
        i,
      );
    if (options.pageSize !== undefined && r.pageSize !== options.pageSize)
      throw new HandshakeInvalid(
        'BAD_PAGE_SIZE',
        `region ${i}: page size ${r.pageSize}, the memory file uses ${options.pageSize}`,
        i,
      );
    if (r.size === 0) throw new HandshakeInvalid('ZERO_SIZE', `region ${i} has size 0`, i);
    for (const [name, v] of [
      ['base_host_virt_addr', r.base],
      ['size', r.size],
      ['offset', r.offset],
    ] as const) {
      if (v % r.pageSize !== 0)
        throw new HandshakeInvalid('UNALIGNED', `region ${i}: ${name} ${v} is not a multiple of ${r.pageSize}`, i);
    }
    if (options.memorySize !== undefined && r.offset + r.size > options.memorySize)
      throw new HandshakeInvalid(
        'PAST_MEMORY_FILE',
        `region ${i}: [${r.offset}, ${r.offset + r.size}) ends past the memory file (${options.memorySize} bytes)`,
        i,
      );
  });
  overlapCheck(regions, (r) => r.base, 'address');
  overlapCheck(regions, (r) => r.offset, 'memory-file offset');
}

function overlapCheck(regions: readonly GuestRegion[], start: (r: GuestRegion) => number, what: string): void {
  const order = regions.map((_, i) => i).sort((a, b) => start(regions[a]!) - start(regions[b]!));
  for (let k = 1; k < order.length; k++) {
    const prev = regions[order[k - 1]!]!;
    const cur = regions[order[k]!]!;
    if (start(prev) + prev.size > start(cur))
      throw new HandshakeInvalid(
        'OVERLAP',
        `regions ${order[k - 1]} and ${order[k]} overlap in ${what} space at ${start(cur)}`,
        order[k],
      );
  }
}

/** The region holding `address`, or undefined. */
export function regionOf(regions: readonly GuestRegion[], address: number): GuestRegion | undefined {
  for (const r of regions) if (address >= r.base && address - r.base < r.size) return r;
  return undefined;
}

/** Start address of the page holding `address` (pages are aligned to the region's base). */
export function pageAddress(region: GuestRegion, address: number): number {
  return region.base + Math.floor((address - region.base) / region.pageSize) * region.pageSize;
}

/** Memory-file offset that serves a fault at `address`: r.offset + (a - r.base), rounded down to the page. */
export function fileOffsetOf(region: GuestRegion, address: number): number {
  return region.offset + (pageAddress(region, address) - region.base);
}

/** The address that maps memory-file offset `offset`, or undefined when no region covers it. */
export function addressOfFileOffset(regions: readonly GuestRegion[], offset: number): number | undefined {
  for (const r of regions) if (offset >= r.offset && offset - r.offset < r.size) return r.base + (offset - r.offset);
  return undefined;
}

/** Bytes of guest memory the regions describe. */
export function regionsSize(regions: readonly GuestRegion[]): number {
  return regions.reduce((n, r) => n + r.size, 0);
}
