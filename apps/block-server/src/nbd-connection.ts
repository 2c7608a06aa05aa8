import type { Socket } from 'node:net';
import {
  ClientFlag,
  Command,
  CommandFlag,
  decodeExportName,
  decodeInfoRequest,
  decodeOptionRequest,
  decodeRequestHeader,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeOptionErrorReply,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
  encodeSimpleReplyHeader,
  InfoType,
  NbdErrno,
  NbdProtocolError,
  Option,
  OptionReply,
  REQUEST_HEADER_SIZE,
  SIMPLE_REPLY_HEADER_SIZE,
  TransmissionFlag,
  type OptionRequest,
  type RequestHeader,
} from '#nbd';
import type { Logger } from '#logging';
import type { WritableBlocks } from '#storage';
import { replyBuffers } from './reply-buffer-pool.js';

/** One export a server offers: bytes come from `blocks`, the server does not know from where. */
export interface NbdExport {
  name: string;
  description?: string;
  blocks: WritableBlocks;
  /** Preferred I/O size reported to clients (NBD_INFO_BLOCK_SIZE). */
  blockSize: number;
  readOnly?: boolean;
}

export interface NbdExportTable {
  /** The export for a requested name; '' asks for the default export. */
  find(name: string): NbdExport | undefined;
  names(): string[];
}

/** What a connection reports per completed request (metrics). */
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
  /** Reading from the socket pauses while this many requests are in flight. */
  maxInFlight?: number;
  /** ...or while this many payload bytes are in flight. */
  maxInFlightBytes?: number;
  /** Called with the socket's fd (e.g. to raise its send buffer). */
  tuneSocket?: (fd: number) => void;
  /** Start in the transmission phase with this export (a kernel socket: no handshake). */
  negotiated?: NbdExport;
}

export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
const KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;
const EMPTY = Buffer.alloc(0);

type Phase = 'client-flags' | 'options' | 'transmission' | 'closed';

/**
 * One client of an NBD export: the fixed-newstyle handshake, then requests served
 * concurrently and answered with simple replies as each completes (out of order). Codec calls
 * only: every byte format lives in #nbd. A protocol violation that loses framing (bad magic,
 * unknown client flags, an oversized option) closes this connection and nothing else; a bad
 * request that keeps framing gets an error reply and the connection stays usable.
 */
export class NbdConnection {
  /** Settles when the socket is closed and every request it started has finished. */
  readonly done: Promise<void>;
  private phase: Phase = 'client-flags';
  private noZeroes = false;
  private export: NbdExport | undefined;
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
  private readonly exports: NbdExportTable;
  private readonly logger: Logger;
  private readonly observer: NbdRequestObserver | undefined;
  private readonly maxPayload: number;
  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;

  constructor(options: NbdConnectionOptions) {
    this.socket = options.socket;
    this.exports = options.exports;
    this.logger = options.logger;
    this.observer = options.observer;
    this.maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.maxInFlight = options.maxInFlight ?? 256;
    this.maxInFlightBytes = options.maxInFlightBytes ?? 256 * 1024 * 1024;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    const fd = (this.socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (options.tuneSocket && typeof fd === 'number' && fd >= 0) options.tuneSocket(fd);
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket.on('drain', () => this.updateFlow());
    this.socket.on('error', (err) => this.logger.debug({ err }, 'nbd client socket error'));
    this.socket.on('close', () => this.onClose());
    if (options.negotiated) this.enterTransmission(options.negotiated);
    else this.socket.write(encodeServerGreeting());
  }

  get requestsInFlight(): number {
    return this.inFlight;
  }

  get exportName(): string | undefined {
    return this.export?.name;
  }

  /** Drops the client at once; requests already running finish, their replies are discarded. */
  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    const buf = this.pending.length > 0 ? Buffer.concat([this.pending, chunk]) : chunk;
    let pos = 0;
    try {
      // After NBD_CMD_DISC the client must send nothing more; whatever it sends is ignored.
      while (this.phase !== 'closed' && !this.disconnecting && pos < buf.length) {
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
        const rest = buf.subarray(pos);
        if (this.phase === 'transmission') {
          if (rest.length < REQUEST_HEADER_SIZE) break;
          const header = decodeRequestHeader(rest);
          pos += REQUEST_HEADER_SIZE;
          pos += this.onRequest(header, buf, pos);
        } else if (this.phase === 'options') {
          const option = decodeOptionRequest(rest);
          if (!option) break;
          pos += option.size;
          this.onOption(option);
        } else {
          if (rest.length < 4) break;
          const flags = rest.readUInt32BE(0);
          pos += 4;
          if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
            this.fail(`client flags 0x${flags.toString(16)} include unknown bits`);
            return;
          }
          this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
          this.phase = 'options';
        }
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

  // ---------------------------------------------------------------- handshake

  private onOption(request: OptionRequest): void {
    const { option, data } = request;
    switch (option) {
      case Option.EXPORT_NAME: {
        const name = safeDecode(() => decodeExportName(data));
        const found = name === undefined ? undefined : this.exports.find(name);
        // No way to send an error to NBD_OPT_EXPORT_NAME: the spec says close.
        if (!found) return this.fail(`unknown export ${JSON.stringify(name)} requested with NBD_OPT_EXPORT_NAME`);
        this.socket.write(encodeExportNameReply(found.blocks.size, transmissionFlags(found), this.noZeroes));
        this.enterTransmission(found);
        return;
      }
      case Option.ABORT:
        this.socket.end(encodeOptionReply(option, OptionReply.ACK));
        this.phase = 'closed';
        return;
      case Option.LIST:
        if (data.length !== 0) {
          this.socket.write(encodeOptionErrorReply(option, OptionReply.ERR_INVALID, 'NBD_OPT_LIST takes no data'));
          return;
        }
        for (const name of this.exports.names()) {
          this.socket.write(encodeOptionReply(option, OptionReply.SERVER, encodeServerEntry(name)));
        }
        this.socket.write(encodeOptionReply(option, OptionReply.ACK));
        return;
      case Option.INFO:
      case Option.GO: {
        let info;
        try {
          info = decodeInfoRequest(data);
        } catch (err) {
          this.socket.write(encodeOptionErrorReply(option, OptionReply.ERR_INVALID, (err as Error).message));
          return;
        }
        const found = this.exports.find(info.exportName);
        if (!found) {
          this.socket.write(
            encodeOptionErrorReply(
              option,
              OptionReply.ERR_UNKNOWN,
              `no export named ${JSON.stringify(info.exportName)}`,
            ),
          );
          return;
        }
        const replies = [encodeInfoExport(found.blocks.size, transmissionFlags(found))];
        if (info.requests.includes(InfoType.NAME)) replies.push(encodeInfoName(found.name));
        if (info.requests.includes(InfoType.DESCRIPTION) && found.description) {
          replies.push(encodeInfoDescription(found.description));
        }
        if (info.requests.includes(InfoType.BLOCK_SIZE)) {
          replies.push(encodeInfoBlockSize(1, found.blockSize, this.maxPayload));
        }
        for (const reply of replies) this.socket.write(encodeOptionReply(option, OptionReply.INFO, reply));
        this.socket.write(encodeOptionReply(option, OptionReply.ACK));
        if (option === Option.GO) this.enterTransmission(found);
        return;
      }
      default:
        // Structured replies, meta contexts, TLS, extended headers: not offered. Clients fall back.
        this.socket.write(encodeOptionErrorReply(option, OptionReply.ERR_UNSUP, `option ${option} is not supported`));
    }
  }

  private enterTransmission(found: NbdExport): void {
    this.export = found;
    this.phase = 'transmission';
  }

  // ---------------------------------------------------------------- transmission

  /** Handles one request; returns how many payload bytes it took from `buf` at `pos`. */
  private onRequest(h: RequestHeader, buf: Buffer, pos: number): number {
    const exp = this.export!;
    const size = exp.blocks.size;
    const end = h.offset + h.length;
    switch (h.type) {
      case Command.READ: {
        if (h.flags !== 0) return this.reject(h, NbdErrno.EINVAL, 0);
        if (h.length > this.maxPayload) return this.reject(h, NbdErrno.EOVERFLOW, 0);
        if (end > size) return this.reject(h, NbdErrno.EINVAL, 0);
        this.startRead(h);
        return 0;
      }
      case Command.WRITE: {
        // The payload follows whatever we answer; it must be consumed to stay in step.
        let error = 0;
        if ((h.flags & ~CommandFlag.FUA) !== 0) error = NbdErrno.EINVAL;
        else if (h.length > this.maxPayload) error = NbdErrno.EOVERFLOW;
        else if (exp.readOnly) error = NbdErrno.EPERM;
        else if (end > size) error = NbdErrno.ENOSPC;
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
        if (h.flags !== 0) return this.reject(h, NbdErrno.EINVAL, 0);
        this.run(h, 0, () => exp.blocks.flush());
        return 0;
      case Command.TRIM:
      case Command.WRITE_ZEROES: {
        const allowed = h.type === Command.TRIM ? CommandFlag.FUA : CommandFlag.FUA | CommandFlag.NO_HOLE;
        if ((h.flags & ~allowed) !== 0) return this.reject(h, NbdErrno.EINVAL, 0);
        if (exp.readOnly) return this.reject(h, NbdErrno.EPERM, 0);
        if (end > size) return this.reject(h, NbdErrno.ENOSPC, 0);
        const noHole = (h.flags & CommandFlag.NO_HOLE) !== 0;
        this.run(h, 0, async () => {
          // NO_HOLE asks for allocated zeros, so they are stored instead of marked.
          if (noHole) await exp.blocks.writeAt(Buffer.alloc(h.length), h.offset);
          else await exp.blocks.zeroAt(h.offset, h.length);
          if ((h.flags & CommandFlag.FUA) !== 0) await exp.blocks.flush();
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
    const blocks = this.export!.blocks;
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
    if (this.phase === 'closed' && this.inFlight === 0) this.resolveDone();
  }

  /**
   * Replies finished in the same turn of the event loop go out in one writev: the socket is
   * corked at the first and uncorked once the turn's promise callbacks have run.
   */
  private writeReply(bytes: Buffer): void {
    if (this.phase === 'closed' || this.socket.destroyed) {
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
    const error =
      err instanceof RangeError
        ? NbdErrno.EINVAL
        : code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG'
          ? NbdErrno.ENOSPC
          : NbdErrno.EIO;
    this.logger.warn({ err, command: h.type, offset: h.offset, length: h.length }, 'nbd request failed');
    return error;
  }

  /** Pauses reading while too much is in flight or the client is not taking replies. */
  private updateFlow(): void {
    if (this.disconnecting || this.phase === 'closed') return;
    const busy =
      this.inFlight >= this.maxInFlight || this.inFlightBytes >= this.maxInFlightBytes || this.socket.writableNeedDrain;
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
    this.phase = 'closed';
    this.socket.destroy();
  }

  private onClose(): void {
    this.phase = 'closed';
    this.payload = undefined;
    this.pending = EMPTY;
    if (this.inFlight === 0) this.resolveDone();
  }
}

function transmissionFlags(exp: NbdExport): number {
  let flags =
    TransmissionFlag.HAS_FLAGS |
    TransmissionFlag.SEND_FLUSH |
    TransmissionFlag.SEND_FUA |
    TransmissionFlag.SEND_TRIM |
    TransmissionFlag.SEND_WRITE_ZEROES |
    // A flush on any connection syncs the one shared overlay, as multi-conn requires.
    TransmissionFlag.CAN_MULTI_CONN;
  if (exp.readOnly) flags |= TransmissionFlag.READ_ONLY;
  return flags;
}

function safeDecode<T>(decode: () => T): T | undefined {
  try {
    return decode();
  } catch {
    return undefined;
  }
}
