import { HandshakeInvalid } from './handshake-error.js';
import { type GuestRegion, validateRegions, type ValidateOptions } from './guest-region.js';

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
