import { isIPv4 } from 'node:net';
import { sbx } from './native-library.js';
import { check } from './syscall-error.js';
import { watchReadable } from './uffd-serve-engine.js';

type Fn = ReturnType<typeof sbx.func>;

// Declared on first use: an older libsbxnative.so without the relay must not break '#native'.
let fns:
  | {
      create: Fn;
      notifyFd: Fn;
      routeSet: Fn;
      routeDelete: Fn;
      adopt: Fn;
      nextHandoff: Fn;
      stats: Fn;
      destroy: Fn;
      parseHead: Fn;
      forwardHead: Fn;
      parseResponse: Fn;
    }
  | undefined;

function relayFunctions(): NonNullable<typeof fns> {
  fns ??= {
    create: sbx.func('int64_t sbx_relay_create(const int64_t *params)'),
    notifyFd: sbx.func('int64_t sbx_relay_notify_fd(int64_t h)'),
    routeSet: sbx.func(
      'int64_t sbx_relay_route_set(int64_t h, const char *sandboxId, uint32_t ip, const char *token, const char *mask)',
    ),
    routeDelete: sbx.func('int64_t sbx_relay_route_delete(int64_t h, const char *sandboxId)'),
    adopt: sbx.func('int64_t sbx_relay_adopt(int64_t h, int fd, uint32_t clientIp)'),
    nextHandoff: sbx.func('int64_t sbx_relay_next_handoff(int64_t h, int64_t *out, uint8_t *buf, uint64_t cap)'),
    stats: sbx.func('int64_t sbx_relay_stats(int64_t h, uint64_t *out, uint64_t n)'),
    destroy: sbx.func('int64_t sbx_relay_destroy(int64_t h)'),
    parseHead: sbx.func(
      'int64_t sbx_relay_parse_head(const uint8_t *buf, uint64_t len, int64_t *out, uint8_t *text, uint64_t cap)',
    ),
    forwardHead: sbx.func(
      'int64_t sbx_relay_forward_head(const uint8_t *buf, uint64_t len, const char *mask, uint32_t clientIp, uint8_t *dst, uint64_t cap)',
    ),
    parseResponse: sbx.func(
      'int64_t sbx_relay_parse_response(const uint8_t *buf, uint64_t len, int head_method, int64_t *out)',
    ),
  };
  return fns;
}

/** Whether the loaded libsbxnative.so has the relay (one built before it has not: rebuild with make -C native). */
export function httpRelayAvailable(): boolean {
  try {
    relayFunctions();
    return true;
  } catch {
    return false;
  }
}

/**
 * Why the relay gave a connection back (RelayHandoff.code). The bytes handed back start exactly
 * at the request that was not forwarded (or are the h2 preface); the TS path answers it.
 */
export const RelayHandoffReason = {
  1: 'H2_PREFACE',
  2: 'BAD_HEAD',
  3: 'HEAD_TOO_LARGE',
  4: 'VERSION',
  5: 'TARGET',
  6: 'HOST',
  7: 'ROUTE_HEADERS',
  8: 'FRAMING',
  9: 'UPGRADE',
  10: 'CONNECTION',
  11: 'EXPECT',
  12: 'NO_ROUTE',
  13: 'TOKEN',
  14: 'CONNECT_FAILED',
  15: 'CONNECT_TIMEOUT',
} as const;
export type RelayHandoffReasonName = (typeof RelayHandoffReason)[keyof typeof RelayHandoffReason];
const REASON_SLOTS = 16;

export interface RelayHandoff {
  /** The client socket; it is the caller's now (wrap it: `new net.Socket({ fd })`). */
  fd: number;
  /** Bytes read from the client and not forwarded (a copy; may be empty). */
  bytes: Buffer;
  code: number;
  reason: RelayHandoffReasonName;
}

export interface HttpRelayOptions {
  threads: number;
  /** Keep-alive idle between requests; the connection is closed after it. */
  clientIdleTimeoutMs: number;
  upstreamConnectTimeoutMs: number;
  /** How long a pooled upstream connection is kept idle (0: no pooling). */
  upstreamIdleTimeoutMs: number;
  /** The TS path's MAX_HEAD_BYTES (16384). */
  maxHeadBytes?: number;
  /** From the request sent to the first response byte; 0 = no bound. */
  upstreamResponseTimeoutMs?: number;
}

/**
 * Counters, summed over the threads. Slots of sbx_relay_stats, in order: 0 adopted,
 * 1 openClients, 2 requests, 3..7 responses 1xx..5xx, 8 bytesUp, 9 bytesDown, 10 upstreamConnects,
 * 11 upstreamConnectFailures, 12 poolReuses, 13 handoffs, 14..29 handoffs per reason code 1..16,
 * 30 idleCloses, 31 upstreamErrors, 32 retries, 33 clientFramingErrors, 34 openUpstreams,
 * 35 idleUpstreams.
 */
export interface HttpRelayStats {
  adopted: number;
  openClients: number;
  /** Request heads forwarded (a retried one counts once). */
  requests: number;
  /** Response heads by class, 1xx (interim ones included) to 5xx. */
  responses: [number, number, number, number, number];
  bytesUp: number;
  bytesDown: number;
  upstreamConnects: number;
  upstreamConnectFailures: number;
  poolReuses: number;
  handoffs: number;
  handoffsByReason: Partial<Record<RelayHandoffReasonName, number>>;
  /** Clients closed after the idle timeout between requests. */
  idleCloses: number;
  /** Upstream failures after request bytes were forwarded: the client connection was closed. */
  upstreamErrors: number;
  /** Bodiless requests sent again after a pooled connection was found reset. */
  retries: number;
  /** Clients whose chunked request framing was broken: both sides closed. */
  clientFramingErrors: number;
  openUpstreams: number;
  idleUpstreams: number;
}

const STAT_COUNT = 14 + REASON_SLOTS + 6;

/** Host order IPv4 of a dotted quad (an IPv4-mapped IPv6 address too), or 0. */
export function ipv4HostOrder(address: string | undefined): number {
  const a = address?.replace(/^::ffff:/i, '');
  if (!a || !isIPv4(a)) return 0;
  return a.split('.').reduce((v, part) => v * 256 + Number(part), 0);
}

/**
 * The native HTTP/1.1 fast path of apps/proxy (native/c/lib/sbx_http_relay.c): epoll threads
 * that forward well-formed keep-alive exchanges for running sandboxes and hand everything else
 * back, at a request boundary, with the unforwarded bytes.
 */
export class HttpRelay {
  private handle: bigint | number;
  private destroyed = false;
  private watch: { close(): void } | undefined;
  private readonly out = new BigInt64Array(3);
  private readonly buf: Buffer;
  private readonly statsOut = new BigUint64Array(STAT_COUNT);
  readonly notifyFd: number;

  constructor(o: HttpRelayOptions) {
    const maxHead = o.maxHeadBytes ?? 16 * 1024;
    const params = new BigInt64Array([
      BigInt(o.threads),
      BigInt(o.clientIdleTimeoutMs),
      BigInt(o.upstreamConnectTimeoutMs),
      BigInt(o.upstreamIdleTimeoutMs),
      BigInt(maxHead),
      BigInt(o.upstreamResponseTimeoutMs ?? 0),
    ]);
    const h = relayFunctions().create(params) as bigint | number;
    check('sbx_relay_create', typeof h === 'bigint' && h > 0n ? 0 : h);
    this.handle = h;
    this.notifyFd = Number(relayFunctions().notifyFd(h));
    // A handoff carries at most maxHead + 64 KiB of read-ahead.
    this.buf = Buffer.allocUnsafe(maxHead + 64 * 1024);
  }

  /** Routes requests for a running sandbox (replacing its route). Empty token / mask: none. */
  setRoute(sandboxId: string, hostIpv4: string, token = '', maskHost = ''): void {
    const ip = ipv4HostOrder(hostIpv4);
    if (!ip) throw new Error(`setRoute(${sandboxId}): ${hostIpv4} is not an IPv4 address`);
    check('sbx_relay_route_set', relayFunctions().routeSet(this.live(), sandboxId, ip, token, maskHost), sandboxId);
  }

  /** Requests for it are handed off from now on; its idle upstream connections are closed. False if unknown. */
  deleteRoute(sandboxId: string): boolean {
    const rc = Number(relayFunctions().routeDelete(this.live(), sandboxId));
    if (rc === -2) return false;
    check('sbx_relay_route_delete', rc, sandboxId);
    return true;
  }

  /**
   * Takes ownership of an accepted TCP socket fd (dup the socket's fd, then destroy the socket).
   * On an error the fd is not taken. `clientAddress`: for X-Forwarded-For (IPv4 only).
   */
  adopt(fd: number, clientAddress?: string): void {
    check('sbx_relay_adopt', relayFunctions().adopt(this.live(), fd, ipv4HostOrder(clientAddress)));
  }

  /** One queued handoff, or null (the notify fd is cleared when the queue is empty). */
  nextHandoff(): RelayHandoff | null {
    const rc = Number(relayFunctions().nextHandoff(this.live(), this.out, this.buf, this.buf.length));
    check('sbx_relay_next_handoff', rc);
    if (rc === 0) return null;
    const code = Number(this.out[2]);
    return {
      fd: Number(this.out[0]),
      bytes: Buffer.from(this.buf.subarray(0, Number(this.out[1]))),
      code,
      reason: RelayHandoffReason[code as keyof typeof RelayHandoffReason] ?? 'BAD_HEAD',
    };
  }

  /** Calls `cb` for each handoff as it comes (on the event loop). */
  onHandoff(cb: (h: RelayHandoff) => void): void {
    this.watch?.close();
    this.watch = watchReadable(this.notifyFd, () => {
      for (let h = this.nextHandoff(); h; h = this.destroyed ? null : this.nextHandoff()) cb(h);
    });
  }

  stats(): HttpRelayStats {
    relayFunctions().stats(this.live(), this.statsOut, STAT_COUNT);
    const s = Array.from(this.statsOut, Number);
    const byReason: Partial<Record<RelayHandoffReasonName, number>> = {};
    for (const [code, name] of Object.entries(RelayHandoffReason)) {
      const n = s[13 + Number(code)] ?? 0;
      if (n) byReason[name] = n;
    }
    const at = 14 + REASON_SLOTS;
    return {
      adopted: s[0]!,
      openClients: s[1]!,
      requests: s[2]!,
      responses: [s[3]!, s[4]!, s[5]!, s[6]!, s[7]!],
      bytesUp: s[8]!,
      bytesDown: s[9]!,
      upstreamConnects: s[10]!,
      upstreamConnectFailures: s[11]!,
      poolReuses: s[12]!,
      handoffs: s[13]!,
      handoffsByReason: byReason,
      idleCloses: s[at]!,
      upstreamErrors: s[at + 1]!,
      retries: s[at + 2]!,
      clientFramingErrors: s[at + 3]!,
      openUpstreams: s[at + 4]!,
      idleUpstreams: s[at + 5]!,
    };
  }

  /** Stops the threads and closes every fd the relay owns (queued handoffs included). */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.watch?.close();
    this.watch = undefined;
    relayFunctions().destroy(this.handle);
  }

  private live(): bigint | number {
    if (this.destroyed) throw new Error('HttpRelay used after destroy()');
    return this.handle;
  }
}

/** What the relay's head parser makes of `buf` (tests: the differential fuzz against http1-head.ts). */
export type RelayHeadVerdict =
  | { kind: 'more' }
  | { kind: 'handoff'; code: number; reason: RelayHandoffReasonName }
  | {
      kind: 'accepted';
      /** Where the head ends in buf (leading blank lines included). */
      end: number;
      /** Where it starts (after leading blank lines). */
      start: number;
      body: 'none' | 'length' | 'chunked';
      contentLength: number;
      port: number;
      sandboxId: string;
      keepAlive: boolean;
    };

export function relayParseHead(buf: Buffer): RelayHeadVerdict {
  const out = new BigInt64Array(8);
  const text = Buffer.alloc(64);
  const rc = Number(relayFunctions().parseHead(buf, buf.length, out, text, text.length));
  if (rc === 0) return { kind: 'more' };
  if (rc === 2) {
    const code = Number(out[0]);
    return { kind: 'handoff', code, reason: RelayHandoffReason[code as keyof typeof RelayHandoffReason] };
  }
  check('sbx_relay_parse_head', rc);
  const port = Number(out[3]);
  const idLen = text.indexOf(0);
  return {
    kind: 'accepted',
    end: Number(out[0]),
    start: Number(out[6]),
    body: (['none', 'length', 'chunked'] as const)[Number(out[1])]!,
    contentLength: Number(out[2]),
    port,
    sandboxId: text.toString('latin1', 0, idLen < 0 ? text.length : idLen),
    keepAlive: out[5] === 1n,
  };
}

/** The head the relay would forward for an accepted head (no leading blank lines), or undefined. */
export function relayForwardHead(head: Buffer, maskHost: string, clientAddress?: string): string | undefined {
  const dst = Buffer.allocUnsafe(2 * head.length + 2048);
  const n = Number(
    relayFunctions().forwardHead(head, head.length, maskHost, ipv4HostOrder(clientAddress), dst, dst.length),
  );
  return n > 0 ? dst.toString('latin1', 0, n) : undefined;
}

/** What the relay makes of a response head (tests: the differential fuzz against http1-head.ts). */
export type RelayResponseVerdict =
  | { kind: 'more' | 'refused' }
  | {
      kind: 'accepted';
      length: number;
      status: number;
      framing: 'none' | 'length' | 'chunked' | 'until-close';
      contentLength: number;
      persistent: boolean;
    };

export function relayParseResponse(buf: Buffer, headMethod = false): RelayResponseVerdict {
  const out = new BigInt64Array(5);
  const rc = Number(relayFunctions().parseResponse(buf, buf.length, headMethod ? 1 : 0, out));
  if (rc === 0) return { kind: 'more' };
  if (rc < 0) return { kind: 'refused' };
  return {
    kind: 'accepted',
    length: Number(out[0]),
    status: Number(out[1]),
    framing: (['none', 'length', 'chunked', 'until-close'] as const)[Number(out[2])]!,
    contentLength: Number(out[3]),
    persistent: out[4] === 1n,
  };
}
