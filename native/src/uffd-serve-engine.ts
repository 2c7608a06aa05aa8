import koffi from 'koffi';
import { sbx } from './native-library.js';
import { check } from './syscall-error.js';

const create = sbx.func('int64_t sbx_serve_create(const int64_t *params, const uint64_t *regions)');
const start = sbx.func('int64_t sbx_serve_start(int64_t h, int nthreads)');
const startPooled = sbx.func('int64_t sbx_serve_start_pooled(int64_t h, int size)');
const poolStart = sbx.func('int64_t sbx_serve_pool_start(int size)');
const notifyFd = sbx.func('int64_t sbx_serve_notify_fd(int64_t h)');
const nextEvent = sbx.func('int64_t sbx_serve_next_event(int64_t h, int64_t *out)');
const markReady = sbx.func('int64_t sbx_serve_mark_ready(int64_t h, uint64_t off, uint64_t len)');
const failServe = sbx.func('int64_t sbx_serve_fail(int64_t h, int code, uint64_t off, int err)');
const stopSourcing = sbx.func('int64_t sbx_serve_stop_sourcing(int64_t h)');
const stats = sbx.func('int64_t sbx_serve_stats(int64_t h, uint64_t *out)');
const copyMap = sbx.func(
  'int64_t sbx_serve_copy_map(int64_t h, int which, uint64_t first, uint64_t count, uint8_t *out)',
);
const stop = sbx.func('int64_t sbx_serve_stop(int64_t h)');
const prefetch = sbx.func(
  'int64_t sbx_serve_prefetch(int64_t h, const uint32_t *blocks, uint64_t count, uint64_t block)',
);
const stopRecording = sbx.func('int64_t sbx_serve_stop_recording(int64_t h)');
const recorded = sbx.func('int64_t sbx_serve_recorded(int64_t h, uint32_t *out, uint64_t cap)');
const destroy = sbx.func('int64_t sbx_serve_destroy(int64_t h)');

/** Bookkeeping unit of the engine (bytes of the memory file per map entry). */
export const SERVE_UNIT = 4096;

export const ServeEventType = { NONE: 0, FETCH: 1, FAILED: 2, PEER_GONE: 3 } as const;
export const ServeFailure = {
  1: 'FAULT_OUTSIDE_REGIONS',
  2: 'COPY_FAILED',
  3: 'READ_FAILED',
  4: 'UNEXPECTED_EVENT',
  5: 'POLL_FAILED',
  6: 'FETCH_FAILED',
  7: 'WRITEPROTECT_FAILED',
} as const;
export type ServeFailureCode = (typeof ServeFailure)[keyof typeof ServeFailure];

export type ServeEvent =
  | { type: 'fetch'; offset: number; length: number; faultOffset: number }
  | { type: 'failed'; code: ServeFailureCode; address: number; errno: number }
  | { type: 'peer-gone' };

export interface ServeRegion {
  base: number;
  size: number;
  offset: number;
  pageSize: number;
}

export interface ServeEngineOptions {
  uffd: number;
  /** pidfd (readable when the peer exits) or the handshake socket (hang-up), or -1. */
  peerFd: number;
  peerKind: 'pidfd' | 'socket' | 'none';
  /** Address of the source view: the memory file laid out at its offsets. */
  sourceAddress: number;
  sourceSize: number;
  /** Every byte of the view is valid now (a mapped local file); else ranges are marked as fetched. */
  allReady: boolean;
  prefetchBytes: number;
  /**
   * Windows to copy ahead of a sequential stream of faults (0 = off): the n-th fault in a row
   * copies up to n more windows, capped here. Only with prefetchBytes > 0.
   */
  readaheadWindows?: number;
  /** Install pages write-protected (UFFDIO_COPY_MODE_WP) so the guest's writes are tracked. */
  installWriteProtected: boolean;
  /** Answer write-protect faults and record the page as dirty (synchronous tracking). */
  syncWriteProtect: boolean;
  regions: ServeRegion[];
  /**
   * Record the blocks of this size the guest faults, first fault first, each once, until
   * `stopRecording()` or stop-sourcing (recorded prefetch). Undefined: no recording.
   */
  recordBlockSize?: number;
}

export interface ServeEngineStats {
  faults: number;
  wpFaults: number;
  bytesServed: number;
  prefetchPages4k: number;
  eexist: number;
  zeroPages4k: number;
  fetchRequests: number;
  fetchWaits: number;
  presentPages4k: number;
  /** Faults served while recording (the start of the sandbox). */
  recordFaults: number;
  /** 4 KiB units the recorded-prefetch pass installed. */
  passPages4k: number;
  /** Pass entries found present already (a fault or a fault's window came first). */
  passAlreadyPresent: number;
  /** Pass entries dealt with so far. */
  passDone: number;
  latencyBoundsUs: number[];
  latencyCounts: number[];
  failedCode: number;
  pendingFaults: number;
}

const STAT_SLOTS = 13;
const HIST = 14;

/**
 * The C fault-serving engine (native/c/lib/sbx_uffd_serve.c): native threads serve faults
 * from the source view; JS watches `notifyFd` and drains events with `nextEvent()`.
 * Maps: 0 = present (1 faulted, 2 prefetched, 3 zero after stop), 1 = dirty, 2 = ready.
 */
export class ServeEngine {
  private handle: bigint | number;
  private destroyed = false;
  private readonly eventOut = new BigInt64Array(4);
  private readonly statsOut = new BigUint64Array(STAT_SLOTS + 2 * HIST + 2);
  readonly notifyFd: number;

  constructor(options: ServeEngineOptions) {
    const params = new BigInt64Array([
      BigInt(options.uffd),
      BigInt(options.peerFd),
      BigInt(options.peerKind === 'pidfd' ? 1 : options.peerKind === 'socket' ? 2 : 0),
      BigInt(options.sourceAddress),
      BigInt(options.sourceSize),
      options.allReady ? 1n : 0n,
      BigInt(options.prefetchBytes),
      options.installWriteProtected ? 2n : 0n,
      options.syncWriteProtect ? 1n : 0n,
      BigInt(options.regions.length),
      BigInt(options.readaheadWindows ?? 0),
      BigInt(options.recordBlockSize ?? 0),
    ]);
    const regions = new BigUint64Array(options.regions.length * 4);
    options.regions.forEach((r, i) => {
      regions[4 * i] = BigInt(r.base);
      regions[4 * i + 1] = BigInt(r.size);
      regions[4 * i + 2] = BigInt(r.offset);
      regions[4 * i + 3] = BigInt(r.pageSize);
    });
    const h = create(params, regions) as bigint | number;
    check('sbx_serve_create', typeof h === 'bigint' && h > 0n ? 0 : h);
    this.handle = h;
    this.notifyFd = Number(notifyFd(this.handle));
  }

  start(threads: number): void {
    check('sbx_serve_start', start(this.handle, threads));
  }

  /**
   * Serves on the process's shared pool instead (instead of `start`): one of `size` workers
   * (started on first use, the first size counts) owns this engine and serves its faults; the
   * thread count no longer grows with the sandboxes. `stop` lets go of it.
   */
  startPooled(size: number): void {
    check('sbx_serve_start_pooled', startPooled(this.handle, size));
  }

  nextEvent(): ServeEvent | null {
    const t = Number(nextEvent(this.handle, this.eventOut));
    const [, a = 0n, b = 0n, c = 0n] = this.eventOut;
    if (t === ServeEventType.FETCH)
      return { type: 'fetch', offset: Number(a), length: Number(b), faultOffset: Number(c) };
    if (t === ServeEventType.FAILED) {
      const code = ServeFailure[Number(a) as keyof typeof ServeFailure] ?? 'COPY_FAILED';
      return { type: 'failed', code, address: Number(b), errno: Number(c) };
    }
    if (t === ServeEventType.PEER_GONE) return { type: 'peer-gone' };
    return null;
  }

  markReady(offset: number, length: number): void {
    check('sbx_serve_mark_ready', markReady(this.handle, offset, length));
  }

  fail(offset: number, errno: number): void {
    failServe(this.handle, 6, offset, errno);
  }

  stopSourcing(): void {
    stopSourcing(this.handle);
  }

  stats(): ServeEngineStats {
    stats(this.handle, this.statsOut);
    const s = Array.from(this.statsOut, Number);
    return {
      faults: s[0] ?? 0,
      wpFaults: s[1] ?? 0,
      bytesServed: s[2] ?? 0,
      prefetchPages4k: s[3] ?? 0,
      eexist: s[4] ?? 0,
      zeroPages4k: s[5] ?? 0,
      fetchRequests: s[6] ?? 0,
      fetchWaits: s[7] ?? 0,
      presentPages4k: s[8] ?? 0,
      recordFaults: s[9] ?? 0,
      passPages4k: s[10] ?? 0,
      passAlreadyPresent: s[11] ?? 0,
      passDone: s[12] ?? 0,
      latencyBoundsUs: s.slice(STAT_SLOTS, STAT_SLOTS + HIST),
      latencyCounts: s.slice(STAT_SLOTS + HIST, STAT_SLOTS + 2 * HIST),
      failedCode: s[STAT_SLOTS + 2 * HIST] ?? 0,
      pendingFaults: s[STAT_SLOTS + 2 * HIST + 1] ?? 0,
    };
  }

  /** Copies map `which` (0 present, 1 dirty, 2 ready) for 4 KiB units [first, first+count). */
  copyMap(which: 0 | 1 | 2, first: number, count: number): Uint8Array {
    const out = new Uint8Array(count);
    check('sbx_serve_copy_map', copyMap(this.handle, which, first, count, out));
    return out;
  }

  /**
   * Starts the recorded-prefetch pass (after `start`): a thread that copies these blocks (index
   * = memory-file offset / blockSize) in order while faults are served; faults always win.
   */
  startPrefetch(blocks: Uint32Array, blockSize: number): void {
    check('sbx_serve_prefetch', prefetch(this.handle, blocks, blocks.length, blockSize));
  }

  /** Ends recording; what was recorded is kept (`recorded()`). */
  stopRecording(): void {
    stopRecording(this.handle);
  }

  recordedCount(): number {
    return Number(recorded(this.handle, null, 0));
  }

  /** The blocks recorded so far, first fault first. */
  recorded(): Uint32Array {
    for (;;) {
      const n = Number(recorded(this.handle, null, 0));
      const out = new Uint32Array(n);
      if (Number(recorded(this.handle, out, n)) === n) return out;
    }
  }

  /** Stops and joins the serving threads (they exit within one poll wake-up). */
  stop(): void {
    if (!this.destroyed) stop(this.handle);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    destroy(this.handle);
  }
}

/**
 * Starts the process's shared serving pool of `size` threads now (once per process; later calls
 * keep the first pool). Returns the pool's size.
 */
export function startServePool(size: number): number {
  const n = Number(poolStart(size));
  check('sbx_serve_pool_start', n < 0 ? n : 0);
  return n;
}

/** Watches an fd for readability on the event loop (libuv poll via koffi), without a thread. */
export function watchReadable(fd: number, onReadable: () => void): { close(): void } {
  const handle = koffi.node.poll(fd, { readable: true }, () => onReadable());
  return { close: () => handle.close() };
}
