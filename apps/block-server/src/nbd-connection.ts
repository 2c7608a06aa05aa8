import type { Socket } from 'node:net';
import type { Logger } from '#logging';
import { socketFd } from '#native';
import {
  Command,
  CommandFlag,
  decodeRequestHeader,
  encodeServerGreeting,
  encodeSimpleReplyHeader,
  NbdErrno,
  NbdProtocolError,
  REQUEST_HEADER_SIZE,
  SIMPLE_REPLY_HEADER_SIZE,
  type RequestHeader,
} from '#nbd';
import type { WritableBlocks } from '#storage';
import { capabilitiesOf, type BlockCapabilities, type NbdExport, type NbdExportTable } from './nbd-export.js';
import { NbdNegotiation } from './nbd-negotiation.js';
import { replyBuffers } from './reply-buffer-pool.js';

/** What a connection reports per completed request (metrics, device stats). */
export interface NbdRequestObserver {
  (event: { command: number; bytes: number; seconds: number; error: number }): void;
}

export interface NbdConnectionOptions {
  socket: Socket;
  exports: NbdExportTable;
  logger: Logger;
  observer?: NbdRequestObserver;
  /** Largest READ/WRITE payload; larger requests get EOVERFLOW. */
  maxPayload?: number;
  /** Called with the socket's fd (e.g. to raise its send buffer). */
  tuneSocket?: (fd: number) => void;
  /** Start in the transmission phase with this export (a kernel socket: no handshake). */
  negotiated?: NbdExport;
}

export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Reading from the socket pauses while this many requests are in flight... */
const MAX_IN_FLIGHT = 256;
/** ...or while this many payload bytes are. */
const MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024;
const EMPTY = Buffer.alloc(0);

/**
 * One client of an NBD export: the greeting and negotiation (nbd-negotiation.ts), then the
 * transmission phase here: requests served concurrently and answered with simple replies as
 * each completes (out of order). Every request's range and flags are checked here, once, so
 * the layers below never see one outside the export or one the stack cannot do. Codec calls
 * only: every byte format lives in #nbd. A protocol violation that loses framing closes this
 * connection and nothing else; a bad request that keeps framing gets an error reply and the
 * connection stays usable.
 */
export class NbdConnection {
  /** Settles when the socket is closed and every request it started has finished. */
  readonly done: Promise<void>;
  private negotiation: NbdNegotiation | undefined;
  private closed = false;
  private export: NbdExport | undefined;
  private can: BlockCapabilities | undefined;
  private pending: Buffer = EMPTY;
  private payload: { header: RequestHeader; data: Buffer; filled: number } | undefined;
  private discard = 0;
  private inFlight = 0;
  private inFlightBytes = 0;
  private readPaused = false;
  private corked = false;
  private disconnecting = false;
  private resolveDone!: () => void;
  private readonly socket: Socket;
  private readonly logger: Logger;
  private readonly observer: NbdRequestObserver | undefined;
  private readonly maxPayload: number;

  constructor(options: NbdConnectionOptions) {
    this.socket = options.socket;
    this.logger = options.logger;
    this.observer = options.observer;
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    const fd = socketFd(this.socket);
    if (options.tuneSocket && fd >= 0) options.tuneSocket(fd);
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket.on('drain', () => this.updateFlow());
    this.socket.on('error', (err) => this.logger.debug({ err }, 'nbd client socket error'));
    this.socket.on('close', () => this.onClose());
    if (options.negotiated) {
      this.enterTransmission(options.negotiated);
    } else {
      this.negotiation = new NbdNegotiation(options.exports, this.maxPayload);
      this.socket.write(encodeServerGreeting());
    }
  }

  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Drops the client at once; requests already running finish, their replies are discarded. */
  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    const buf = this.pending.length > 0 ? Buffer.concat([this.pending, chunk]) : chunk;
    let pos = 0;
    try {
      if (this.negotiation) {
        const negotiation = this.negotiation;
        pos = negotiation.feed(buf, (bytes) => this.socket.write(bytes));
        if (negotiation.aborted) {
          this.closed = true;
          this.socket.end();
          return;
        }
        if (negotiation.chosen) this.enterTransmission(negotiation.chosen);
      }
      // After NBD_CMD_DISC the client must send nothing more; whatever it sends is ignored.
      while (!this.negotiation && !this.closed && !this.disconnecting && pos < buf.length) {
        if (this.payload) {
          const p = this.payload;
          const take = Math.min(p.data.length - p.filled, buf.length - pos);
          buf.copy(p.data, p.filled, pos, pos + take);
          p.filled += take;
          pos += take;
          if (p.filled < p.data.length) break;
          this.payload = undefined;
          this.startWrite(p.header, p.data);
          continue;
        }
        if (this.discard > 0) {
          const take = Math.min(this.discard, buf.length - pos);
          this.discard -= take;
          pos += take;
          continue;
        }
        if (buf.length - pos < REQUEST_HEADER_SIZE) break;
        const header = decodeRequestHeader(buf, pos);
        pos += REQUEST_HEADER_SIZE;
        pos += this.onRequest(header, buf, pos);
      }
    } catch (err) {
      if (err instanceof NbdProtocolError) {
        this.fail(err.message);
        return;
      }
      throw err;
    }
    // Keep a copy of a short tail only, so a big socket chunk is not held by a few bytes.
    this.pending = pos >= buf.length ? EMPTY : Buffer.from(buf.subarray(pos));
  }

  private enterTransmission(found: NbdExport): void {
    this.negotiation = undefined;
    this.export = found;
    // Asked once per connection, as nbdkit does: the flags the client was sent stay true.
    this.can = capabilitiesOf(found.blocks);
  }

  /** Handles one request; returns how many payload bytes it took from `buf` at `pos`. */
  private onRequest(h: RequestHeader, buf: Buffer, pos: number): number {
    const can = this.can!;
    const blocks = this.export!.blocks as WritableBlocks;
    const outside = h.offset + h.length > blocks.size;
    const fua = (h.flags & CommandFlag.FUA) !== 0;
    switch (h.type) {
      case Command.READ: {
        if (h.flags !== 0) return this.reject(h, NbdErrno.EINVAL, 0);
        if (h.length > this.maxPayload) return this.reject(h, NbdErrno.EOVERFLOW, 0);
        if (outside) return this.reject(h, NbdErrno.EINVAL, 0);
        this.startRead(h);
        return 0;
      }
      case Command.WRITE: {
        // The payload follows whatever we answer; it must be consumed to stay in step.
        let error = 0;
        if ((h.flags & ~CommandFlag.FUA) !== 0 || (fua && !can.fua)) error = NbdErrno.EINVAL;
        else if (h.length > this.maxPayload) error = NbdErrno.EOVERFLOW;
        else if (!can.write) error = NbdErrno.EPERM;
        else if (outside) error = NbdErrno.ENOSPC;
        if (error !== 0) return this.reject(h, error, h.length);
        const available = buf.length - pos;
        if (available >= h.length) {
          // Socket chunks are never reused by Node, so the payload can be a view.
          this.startWrite(h, buf.subarray(pos, pos + h.length));
          return h.length;
        }
        const data = Buffer.allocUnsafe(h.length);
        buf.copy(data, 0, pos);
        this.payload = { header: h, data, filled: available };
        return available;
      }
      case Command.DISC:
        this.disconnecting = true;
        this.socket.pause();
        this.finishDisconnect();
        return 0;
      case Command.FLUSH:
        if (h.flags !== 0 || !can.flush) return this.reject(h, NbdErrno.EINVAL, 0);
        this.run(h, 0, () => blocks.flush());
        return 0;
      case Command.TRIM:
      case Command.WRITE_ZEROES: {
        const trim = h.type === Command.TRIM;
        const allowed = trim ? CommandFlag.FUA : CommandFlag.FUA | CommandFlag.NO_HOLE;
        if ((h.flags & ~allowed) !== 0 || (fua && !can.fua) || !(trim ? can.trim : can.zero)) {
          return this.reject(h, NbdErrno.EINVAL, 0);
        }
        if (!can.write) return this.reject(h, NbdErrno.EPERM, 0);
        if (outside) return this.reject(h, NbdErrno.ENOSPC, 0);
        const noHole = (h.flags & CommandFlag.NO_HOLE) !== 0;
        this.run(h, 0, async () => {
          // NO_HOLE asks for allocated zeros, so they are stored instead of marked.
          if (noHole) await blocks.writeAt(Buffer.alloc(h.length), h.offset);
          else await blocks.zeroAt(h.offset, h.length);
          if (fua) await blocks.flush();
        });
        return 0;
      }
      default:
        return this.reject(h, NbdErrno.EINVAL, 0);
    }
  }

  /** Replies with an error and skips the request's payload (`payloadBytes`, possibly not here yet). */
  private reject(h: RequestHeader, error: number, payloadBytes: number): number {
    this.logger.debug({ command: h.type, offset: h.offset, length: h.length, error }, 'nbd request rejected');
    this.writeReply(encodeSimpleReplyHeader(error, h.cookie));
    this.observer?.({ command: h.type, bytes: 0, seconds: 0, error });
    this.discard += payloadBytes;
    return 0;
  }

  private startRead(h: RequestHeader): void {
    const reply = replyBuffers.take(SIMPLE_REPLY_HEADER_SIZE + h.length);
    this.track(h.length);
    const started = performance.now();
    this.export!.blocks.readAt(reply.subarray(SIMPLE_REPLY_HEADER_SIZE), h.offset).then(
      () => {
        encodeSimpleReplyHeader(0, h.cookie, reply, 0);
        this.complete(h, h.length, started, 0, reply);
      },
      (err: unknown) => {
        replyBuffers.give(reply);
        this.complete(h, h.length, started, this.errnoFor(err, h), undefined);
      },
    );
  }

  private startWrite(h: RequestHeader, data: Buffer): void {
    const blocks = this.export!.blocks as WritableBlocks;
    this.run(h, data.length, async () => {
      await blocks.writeAt(data, h.offset);
      if ((h.flags & CommandFlag.FUA) !== 0) await blocks.flush();
    });
  }

  private run(h: RequestHeader, bytes: number, op: () => Promise<void>): void {
    this.track(bytes);
    const started = performance.now();
    op().then(
      () => this.complete(h, bytes, started, 0, undefined),
      (err: unknown) => this.complete(h, bytes, started, this.errnoFor(err, h), undefined),
    );
  }

  private track(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
    this.updateFlow();
  }

  private complete(h: RequestHeader, bytes: number, started: number, error: number, reply: Buffer | undefined): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    this.observer?.({ command: h.type, bytes, seconds: (performance.now() - started) / 1000, error });
    this.writeReply(reply && error === 0 ? reply : encodeSimpleReplyHeader(error, h.cookie));
    this.updateFlow();
    if (this.disconnecting) this.finishDisconnect();
    if (this.closed && this.inFlight === 0) this.resolveDone();
  }

  /**
   * Replies finished in the same turn of the event loop go out in one writev: the socket is
   * corked at the first and uncorked once the turn's promise callbacks have run.
   */
  private writeReply(bytes: Buffer): void {
    if (this.closed || this.socket.destroyed) {
      replyBuffers.give(bytes);
      return;
    }
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    if (bytes.length >= replyBuffers.minSize) this.socket.write(bytes, () => replyBuffers.give(bytes));
    else this.socket.write(bytes);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  private errnoFor(err: unknown, h: RequestHeader): number {
    const code = (err as NodeJS.ErrnoException | undefined)?.code;
    const error = code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG' ? NbdErrno.ENOSPC : NbdErrno.EIO;
    this.logger.warn({ err, command: h.type, offset: h.offset, length: h.length }, 'nbd request failed');
    return error;
  }

  /** Pauses reading while too much is in flight or the client is not taking replies. */
  private updateFlow(): void {
    if (this.disconnecting || this.closed) return;
    const busy =
      this.inFlight >= MAX_IN_FLIGHT || this.inFlightBytes >= MAX_IN_FLIGHT_BYTES || this.socket.writableNeedDrain;
    if (busy && !this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    } else if (!busy && this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
  }

  /** NBD_CMD_DISC: every outstanding request is answered first, then the socket closes. */
  private finishDisconnect(): void {
    if (this.inFlight === 0 && !this.socket.destroyed) this.socket.end();
  }

  private fail(reason: string): void {
    this.logger.warn({ reason, exportName: this.export?.name }, 'nbd client dropped: protocol violation');
    this.closed = true;
    this.socket.destroy();
  }

  private onClose(): void {
    this.closed = true;
    this.payload = undefined;
    this.pending = EMPTY;
    if (this.inFlight === 0) this.resolveDone();
  }
}
