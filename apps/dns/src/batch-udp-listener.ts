import type { Logger } from '#logging';
import type { DnsResponder } from './dns-responder.js';
import {
  allocNative,
  boundPort,
  IOVEC_SIZE,
  loadLibc,
  MSG_DONTWAIT,
  MSG_TRUNC,
  MSG_WAITFORONE,
  MSGHDR_SIZE,
  openUdpSocket,
  shutdownSocket,
  SOCKADDR_SIZE,
  type Libc,
  type NativeBlock,
} from '#native';
import { QueryResult, Transport, type QueryCounters } from './query-counters.js';
import { TypedError } from '#service-kit';

export interface BatchUdpListenerOptions {
  host: string;
  /** 0 picks a free port (shared by all sockets). */
  port: number;
  responder: DnsResponder;
  counters: QueryCounters;
  logger: Logger;
  /** Sockets on the port (SO_REUSEPORT when more than one). */
  sockets: number;
  /** Datagrams per recvmmsg/sendmmsg call. */
  batch?: number;
  /** Receives in flight per socket (each on a thread-pool thread), default 1. */
  receivers?: number;
}

/** Largest query accepted over UDP; longer ones arrive cut (MSG_TRUNC) and are dropped. */
const IN_SLOT = 4096;
/** Our answers are under 300 bytes (header, one question, one A record, one OPT). */
const OUT_SLOT = 512;
const RECEIVE_TIMEOUT_MS = 250;
/** Batches received without blocking before yielding to the event loop. */
const DRAIN_BATCHES = 16;

/** Thrown by `start` where the libc bindings cannot load; the caller falls back to dgram. */
export class BatchUdpUnavailable extends TypedError {
  readonly code = 'DNS_BATCH_UDP_UNAVAILABLE';
  constructor() {
    super('recvmmsg/sendmmsg through libc are not available on this platform');
  }
}

/**
 * UDP through recvmmsg/sendmmsg: the main thread answers a whole batch of datagrams into native
 * send buffers and sends it with one sendmmsg. While datagrams keep coming it receives them itself
 * without blocking; once the socket is empty one receive waits on the libuv thread pool (koffi
 * async call, blocking with a timeout), so an idle server costs nothing and a lone query one
 * thread-pool round trip.
 */
export class BatchUdpListener {
  private constructor(
    private readonly sockets: BatchSocket[],
    readonly port: number,
  ) {}

  static start(options: BatchUdpListenerOptions): BatchUdpListener {
    const lib = loadLibc();
    if (!lib) throw new BatchUdpUnavailable();
    const sockets: BatchSocket[] = [];
    let port = options.port;
    try {
      for (let i = 0; i < Math.max(1, options.sockets); i++) {
        const fd = openUdpSocket(lib, options.host, port, {
          reusePort: options.sockets > 1,
          receiveTimeoutMs: RECEIVE_TIMEOUT_MS,
          receiveBufferBytes: 1 << 20,
        });
        try {
          sockets.push(new BatchSocket(lib, fd, options));
        } catch (err) {
          lib.close(fd);
          throw err;
        }
        if (port === 0) port = boundPort(lib, fd);
      }
    } catch (err) {
      for (const socket of sockets) socket.dispose();
      throw err;
    }
    for (const socket of sockets) socket.run();
    return new BatchUdpListener(sockets, port);
  }

  async close(): Promise<void> {
    await Promise.all(this.sockets.map((s) => s.stop()));
  }
}

/**
 * One batch of receive buffers: a recvmmsg vector, one sockaddr and one 4 KiB slot per datagram.
 * A socket has several, each with its own receive in flight, so the kernel fills one while the
 * main thread answers another.
 */
class ReceiveRing {
  readonly vec: NativeBlock;
  readonly vec32: Uint32Array;
  readonly inBuf: NativeBlock;
  /** sockaddr of datagram i, where sendmmsg's msg_name points for its answer. */
  readonly nameAddress: BigUint64Array;
  private readonly names: NativeBlock;
  private readonly iovs: NativeBlock;
  /** In a receive cycle: waiting on the pool, draining, or about to retry. */
  busy = false;

  constructor(readonly vlen: number) {
    this.vec = allocNative(vlen * MSGHDR_SIZE);
    this.names = allocNative(vlen * SOCKADDR_SIZE);
    this.iovs = allocNative(vlen * IOVEC_SIZE);
    this.inBuf = allocNative(vlen * IN_SLOT);
    this.vec32 = view32(this.vec);
    this.nameAddress = new BigUint64Array(vlen);
    const vec = this.vec.bytes;
    const iov = this.iovs.bytes;
    for (let i = 0; i < vlen; i++) {
      this.nameAddress[i] = this.names.address + BigInt(i * SOCKADDR_SIZE);
      iov.writeBigUInt64LE(this.inBuf.address + BigInt(i * IN_SLOT), i * IOVEC_SIZE);
      iov.writeBigUInt64LE(BigInt(IN_SLOT), i * IOVEC_SIZE + 8);
      // struct mmsghdr: name @0, namelen @8, iov @16, iovlen @24, control @32, controllen @40,
      // flags @48, then msg_len @56.
      const h = i * MSGHDR_SIZE;
      vec.writeBigUInt64LE(this.nameAddress[i]!, h);
      vec.writeUInt32LE(SOCKADDR_SIZE, h + 8);
      vec.writeBigUInt64LE(this.iovs.address + BigInt(i * IOVEC_SIZE), h + 16);
      vec.writeBigUInt64LE(1n, h + 24);
    }
  }

  free(): void {
    for (const block of [this.vec, this.names, this.iovs, this.inBuf]) block.free();
  }
}

function view32(block: NativeBlock): Uint32Array {
  return new Uint32Array(block.bytes.buffer, block.bytes.byteOffset, block.bytes.length >> 2);
}

class BatchSocket {
  private readonly vlen: number;
  private readonly rings: ReceiveRing[];
  private readonly sendVec: NativeBlock;
  private readonly sendIovs: NativeBlock;
  private readonly outBuf: NativeBlock;
  private readonly sendVec32: Uint32Array;
  private readonly sendVec64: BigUint64Array;
  private readonly sendIovs32: Uint32Array;
  private stopping = false;
  private stopped: Promise<void> | undefined;
  private finish: () => void = () => undefined;
  private lastError = 0;
  private disposed = false;

  constructor(
    private readonly lib: Libc,
    private readonly fd: number,
    private readonly options: BatchUdpListenerOptions,
  ) {
    const vlen = (this.vlen = options.batch ?? 64);
    this.rings = Array.from({ length: Math.max(1, options.receivers ?? 1) }, () => new ReceiveRing(vlen));
    this.sendVec = allocNative(vlen * MSGHDR_SIZE);
    this.sendIovs = allocNative(vlen * IOVEC_SIZE);
    this.outBuf = allocNative(vlen * OUT_SLOT);
    this.sendVec32 = view32(this.sendVec);
    this.sendIovs32 = view32(this.sendIovs);
    this.sendVec64 = new BigUint64Array(this.sendVec.bytes.buffer, this.sendVec.bytes.byteOffset, vlen * 8);
    const send = this.sendVec.bytes;
    const iov = this.sendIovs.bytes;
    for (let i = 0; i < vlen; i++) {
      iov.writeBigUInt64LE(this.outBuf.address + BigInt(i * OUT_SLOT), i * IOVEC_SIZE);
      send.writeBigUInt64LE(this.sendIovs.address + BigInt(i * IOVEC_SIZE), i * MSGHDR_SIZE + 16);
      send.writeBigUInt64LE(1n, i * MSGHDR_SIZE + 24);
    }
  }

  run(): void {
    this.stopped = new Promise((resolve) => (this.finish = resolve));
    for (const ring of this.rings) {
      ring.busy = true;
      this.receive(ring);
    }
  }

  /** A ring that sees the socket stopping leaves its cycle; the last one out resolves `stopped`. */
  private leave(ring: ReceiveRing): void {
    ring.busy = false;
    if (this.rings.every((r) => !r.busy)) this.finish();
  }

  /** Waits on the thread pool for the next datagrams (the idle path). */
  private receive(ring: ReceiveRing): void {
    if (this.stopping) {
      this.leave(ring);
      return;
    }
    const issued = Date.now();
    this.lib.recvmmsg.async(this.fd, ring.vec.pointer, this.vlen, MSG_WAITFORONE, null, (err, n) => {
      if (this.stopping) {
        this.leave(ring);
        return;
      }
      if (!err && n > 0) {
        this.answer(ring, n);
        this.drain(ring);
        return;
      }
      // A receive timeout (EAGAIN after RECEIVE_TIMEOUT_MS) is the idle case; anything returning
      // sooner is an error worth a log line and a pause rather than a spin.
      const now = Date.now();
      if (now - issued < RECEIVE_TIMEOUT_MS / 2) {
        if (now - this.lastError > 5000) {
          this.lastError = now;
          this.options.logger.warn({ err, fd: this.fd }, 'udp receive failed; retrying');
        }
        setTimeout(() => this.receive(ring), 50);
      } else {
        this.receive(ring);
      }
    });
  }

  /**
   * The busy path: while datagrams keep coming, receive them here without blocking, so a loaded
   * server does not pay a thread hand-off (and a scheduler wake-up) per batch. Yields to the event
   * loop every DRAIN_BATCHES batches so TCP and the control socket are served too, and goes back to
   * waiting on the thread pool once the socket is empty.
   */
  private drain(ring: ReceiveRing): void {
    for (let batch = 0; batch < DRAIN_BATCHES; batch++) {
      if (this.stopping) {
        this.leave(ring);
        return;
      }
      const n = this.lib.recvmmsg(this.fd, ring.vec.pointer, this.vlen, MSG_DONTWAIT, null);
      if (n <= 0) {
        this.receive(ring);
        return;
      }
      this.answer(ring, n);
    }
    setImmediate(() => this.drain(ring));
  }

  private answer(ring: ReceiveRing, n: number): void {
    const { responder, counters } = this.options;
    const recv32 = ring.vec32;
    const inBytes = ring.inBuf.bytes;
    const send32 = this.sendVec32;
    const outBytes = this.outBuf.bytes;
    let count = 0;
    for (let i = 0; i < n; i++) {
      const h = (i * MSGHDR_SIZE) >> 2;
      const length = recv32[h + 14]!;
      const flags = recv32[h + 12]!;
      const nameLength = recv32[h + 2]!;
      recv32[h + 2] = SOCKADDR_SIZE;
      if (flags & MSG_TRUNC) {
        counters.count(Transport.UDP, -1, QueryResult.DROPPED);
        continue;
      }
      const msg = inBytes.subarray(i * IN_SLOT, i * IN_SLOT + length);
      let written: number;
      try {
        written = responder.respondInto(msg, Transport.UDP, outBytes, count * OUT_SLOT, OUT_SLOT);
      } catch (err) {
        counters.count(Transport.UDP, -1, QueryResult.SERVFAIL);
        this.logFailure(err, length);
        continue;
      }
      if (written <= 0) continue;
      const s = (count * MSGHDR_SIZE) >> 2;
      this.sendVec64[s >> 1] = ring.nameAddress[i]!;
      send32[s + 2] = nameLength;
      this.sendIovs32[((count * IOVEC_SIZE) >> 2) + 2] = written;
      count++;
    }
    if (count > 0) {
      // Non-blocking: when the socket's send queue is full the rest is dropped, as UDP may.
      this.lib.sendmmsg(this.fd, this.sendVec.pointer, count, MSG_DONTWAIT);
    }
  }

  private logFailure(err: unknown, bytes: number): void {
    const now = Date.now();
    if (now - this.lastError > 1000) {
      this.lastError = now;
      this.options.logger.error({ err, bytes }, 'udp query failed');
    }
  }

  async stop(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      shutdownSocket(this.lib, this.fd);
    }
    if (this.rings.some((r) => r.busy)) await this.stopped;
    this.dispose();
  }

  /** Closes the fd and frees native memory; only once no receive is in flight. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.lib.close(this.fd);
    for (const ring of this.rings) ring.free();
    for (const block of [this.sendVec, this.sendIovs, this.outBuf]) block.free();
  }
}
