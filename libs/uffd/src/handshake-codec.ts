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

/**
 * Firecracker's UFFD handshake message (DESIGN.md §4): a JSON array of
 * `{"base_host_virt_addr", "size", "offset", "page_size"}`; older Firecracker spells the last
 * `page_size_kib` and, despite the name, puts bytes in it. Pure functions: no sockets.
 */
export type PageSizeKey = 'page_size' | 'page_size_kib';

export interface Handshake {
  regions: GuestRegion[];
  /** Which spelling the peer used. */
  pageSizeKey: PageSizeKey;
  /** The memfd backing guest memory, when the peer sent a second fd. */
  hasMemfd: boolean;
}

export interface ParseOptions extends ValidateOptions {
  /** How many fds came with the message (1: uffd, 2: uffd + memfd). */
  fdCount: number;
  /** The message filled the receive buffer or control data was cut. */
  truncated?: boolean;
}

function field(obj: Record<string, unknown>, key: string, index: number): number {
  const v = obj[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
    throw new HandshakeInvalid(
      'BAD_FIELD',
      `region ${index}: ${key} must be a non-negative integer, got ${JSON.stringify(v)}`,
      index,
    );
  return v;
}

/** Decodes the regions without validating them against each other. */
export function decodeRegions(payload: Uint8Array | string): { regions: GuestRegion[]; pageSizeKey: PageSizeKey } {
  const text =
    typeof payload === 'string'
      ? payload
      : Buffer.from(payload.buffer, payload.byteOffset, payload.length).toString('utf8');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new HandshakeInvalid('BAD_JSON', `payload is not JSON (${(err as Error).message}): ${text.slice(0, 80)}`);
  }
  if (!Array.isArray(json))
    throw new HandshakeInvalid('NOT_AN_ARRAY', `payload is ${typeof json}, not an array of regions`);
  let key: PageSizeKey | undefined;
  const regions = json.map((item: unknown, i): GuestRegion => {
    if (typeof item !== 'object' || item === null || Array.isArray(item))
      throw new HandshakeInvalid('BAD_FIELD', `region ${i} is not an object`, i);
    const obj = item as Record<string, unknown>;
    const hasNew = 'page_size' in obj;
    const hasOld = 'page_size_kib' in obj;
    if (!hasNew && !hasOld)
      throw new HandshakeInvalid('BAD_FIELD', `region ${i} has neither page_size nor page_size_kib`, i);
    const pageSize = hasNew ? field(obj, 'page_size', i) : field(obj, 'page_size_kib', i);
    if (hasNew && hasOld && field(obj, 'page_size_kib', i) !== pageSize)
      throw new HandshakeInvalid('BAD_FIELD', `region ${i}: page_size and page_size_kib disagree`, i);
    key ??= hasNew ? 'page_size' : 'page_size_kib';
    return {
      base: field(obj, 'base_host_virt_addr', i),
      size: field(obj, 'size', i),
      offset: field(obj, 'offset', i),
      pageSize,
    };
  });
  return { regions, pageSizeKey: key ?? 'page_size' };
}

/** Decodes and validates a handshake; throws HandshakeInvalid saying what was wrong. */
export function parseHandshake(payload: Uint8Array | string, options: ParseOptions): Handshake {
  if (options.truncated) throw new HandshakeInvalid('TRUNCATED', 'the handshake message or its control data was cut');
  if (options.fdCount !== 1 && options.fdCount !== 2)
    throw new HandshakeInvalid(
      'FD_COUNT',
      `expected 1 fd (userfaultfd) or 2 (userfaultfd and memfd), got ${options.fdCount}`,
    );
  const { regions, pageSizeKey } = decodeRegions(payload);
  validateRegions(regions, options);
  return { regions, pageSizeKey, hasMemfd: options.fdCount === 2 };
}

/** Encodes regions as Firecracker sends them (used by the VMM double and tests). */
export function encodeHandshake(regions: readonly GuestRegion[], key: PageSizeKey = 'page_size'): Uint8Array {
  const json = JSON.stringify(
    regions.map((r) => ({ base_host_virt_addr: r.base, size: r.size, offset: r.offset, [key]: r.pageSize })),
  );
  return new TextEncoder().encode(json);
}
