import { sbx } from './native-library.js';
import { check } from './syscall-error.js';
import { watchReadable } from './uffd-serve-engine.js';

type Fn = ReturnType<typeof sbx.func>;

// Declared on first use: an older libsbxnative.so without the engine must not break '#native'.
let fns: { create: Fn; notifyFd: Fn; adopt: Fn; close: Fn; nextEvent: Fn; stats: Fn; destroy: Fn } | undefined;

function tunnelFunctions(): NonNullable<typeof fns> {
  fns ??= {
    create: sbx.func('int64_t sbx_tunnel_create(const int64_t *params)'),
    notifyFd: sbx.func('int64_t sbx_tunnel_notify_fd(int64_t h)'),
    adopt: sbx.func('int64_t sbx_tunnel_adopt(int64_t h, int fdA, int fdB, const uint8_t *first, uint64_t len)'),
    close: sbx.func('int64_t sbx_tunnel_close(int64_t h, int64_t id)'),
    nextEvent: sbx.func('int64_t sbx_tunnel_next_event(int64_t h, int64_t *out)'),
    stats: sbx.func('int64_t sbx_tunnel_stats(int64_t h, uint64_t *out, uint64_t n)'),
    destroy: sbx.func('int64_t sbx_tunnel_destroy(int64_t h)'),
  };
  return fns;
}

/** Whether the loaded libsbxnative.so has the tunnel engine (rebuild with make -C native). */
export function tunnelEngineAvailable(): boolean {
  try {
    tunnelFunctions();
    return true;
  } catch {
    return false;
  }
}

/** How a tunnel ended. */
export type TunnelEnd =
  /** Both directions finished (FIN each way, every byte delivered); sockets closed. */
  | 'done'
  /** A socket failed (reset, broken pipe...): both sockets were closed with a reset. */
  | 'reset'
  /** close(id): both sockets were closed with a reset. */
  | 'closed';

const END_NAMES: Record<number, TunnelEnd> = { 1: 'done', 2: 'reset', 3: 'closed' };

export interface TunnelEnded {
  id: number;
  /** Bytes delivered from A to B (the first bytes included) and from B to A. */
  bytesAtoB: number;
  bytesBtoA: number;
  reason: TunnelEnd;
  /** The errno of a 'reset' (0 otherwise). */
  errno: number;
}

export interface TunnelEngineOptions {
  threads: number;
  /** 'splice' (default): socket -> pipe -> socket in the kernel. 'copy': read/write through a buffer. */
  mode?: 'splice' | 'copy';
  /** Pipe (or buffer) size per direction, 4 KiB to 1 MiB; 256 KiB by default. */
  pipeBytes?: number;
}

export interface TunnelEngineStats {
  adopted: number;
  open: number;
  /** Bytes of ended tunnels, each way. */
  bytesAtoB: number;
  bytesBtoA: number;
  done: number;
  reset: number;
  closed: number;
}

/**
 * Byte tunnels on native epoll threads (native/c/lib/sbx_tunnel.c): each joins two connected
 * stream sockets, bytes moved both ways with splice(2), a FIN passed on one way while the other
 * keeps flowing, nothing read from a side while the other is not taking its bytes.
 */
export class TunnelEngine {
  private readonly handle: bigint | number;
  private destroyed = false;
  private watch: { close(): void } | undefined;
  private readonly out = new BigInt64Array(5);
  private readonly statsOut = new BigUint64Array(7);
  readonly notifyFd: number;

  constructor(o: TunnelEngineOptions) {
    const params = new BigInt64Array([BigInt(o.threads), BigInt(o.mode === 'copy' ? 1 : 0), BigInt(o.pipeBytes ?? 0)]);
    const h = tunnelFunctions().create(params) as bigint | number;
    check('sbx_tunnel_create', Number(h) > 0 ? 0 : Number(h));
    this.handle = h;
    this.notifyFd = Number(tunnelFunctions().notifyFd(h));
  }

  /**
   * Takes ownership of two connected stream socket fds (dup them from their Node sockets, then
   * destroy those) and returns the tunnel id. `firstAtoB`: bytes already read from A, sent to B
   * before anything else. On an error neither fd is taken.
   */
  adopt(fdA: number, fdB: number, firstAtoB?: Buffer): number {
    const first = firstAtoB && firstAtoB.length ? firstAtoB : null;
    const id = Number(tunnelFunctions().adopt(this.live(), fdA, fdB, first, first ? first.length : 0));
    check('sbx_tunnel_adopt', id < 0 ? id : 0);
    return id;
  }

  /** Resets both sockets of a tunnel (its event says 'closed'); an ended or unknown id is ignored. */
  close(id: number): void {
    check('sbx_tunnel_close', Number(tunnelFunctions().close(this.live(), id)));
  }

  /** One ended tunnel, or null (the notify fd is cleared when none is queued). */
  nextEvent(): TunnelEnded | null {
    const rc = Number(tunnelFunctions().nextEvent(this.live(), this.out));
    if (rc === 0) return null;
    const o = this.out;
    return {
      id: Number(o[0]),
      bytesAtoB: Number(o[1]),
      bytesBtoA: Number(o[2]),
      reason: END_NAMES[Number(o[3])] ?? 'reset',
      errno: Number(o[4]),
    };
  }

  /** Calls `cb` for each ended tunnel as it comes (on the event loop). */
  onEnded(cb: (e: TunnelEnded) => void): void {
    this.watch?.close();
    this.watch = watchReadable(this.notifyFd, () => {
      for (let e = this.nextEvent(); e; e = this.destroyed ? null : this.nextEvent()) cb(e);
    });
  }

  stats(): TunnelEngineStats {
    tunnelFunctions().stats(this.live(), this.statsOut, this.statsOut.length);
    const s = Array.from(this.statsOut, Number);
    return {
      adopted: s[0]!,
      open: s[1]!,
      bytesAtoB: s[2]!,
      bytesBtoA: s[3]!,
      done: s[4]!,
      reset: s[5]!,
      closed: s[6]!,
    };
  }

  /** Stops the threads and closes every fd the engine owns (open tunnels reset, no events). */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.watch?.close();
    this.watch = undefined;
    tunnelFunctions().destroy(this.handle);
  }

  private live(): bigint | number {
    if (this.destroyed) throw new Error('TunnelEngine used after destroy()');
    return this.handle;
  }
}
