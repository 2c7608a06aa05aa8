import { connect, type Socket } from 'node:net';
import {
  ClientFlag,
  Command,
  CommandFlag,
  HandshakeFlag,
  InfoType,
  Option,
  OptionReply,
  REQUEST_HEADER_SIZE,
  SIMPLE_REPLY_HEADER_SIZE,
  TransmissionFlag,
  decodeInfo,
  decodeOptionReply,
  decodeServerGreeting,
  decodeSimpleReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOptionRequest,
  encodeRequestHeader,
  isOptionReplyError,
} from '#nbd';
import type { WritableBlocks } from '#storage';
import { VmmFailure } from './api-error.js';

/**
 * The guest's side of an NBD device on a Unix socket: what the kernel's nbd client or
 * Firecracker's virtio-block over /dev/nbdX would send. Fixed-newstyle handshake with
 * NBD_OPT_GO, then READ/WRITE/FLUSH/WRITE_ZEROES with several requests in flight, replies
 * matched by cookie in whatever order they come. The wire format is libs/nbd's codec.
 */
export class NbdClient implements WritableBlocks {
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private inbox: Buffer = Buffer.alloc(0);
  private failure: Error | undefined;
  private closed = false;

  private constructor(
    private readonly socket: Socket,
    readonly size: number,
    readonly transmissionFlags: number,
  ) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new VmmFailure('NBD_DISCONNECTED', 'NBD server closed the connection')));
  }

  /** Connects to `socketPath` and negotiates `exportName` with NBD_OPT_GO. */
  static async connect(socketPath: string, exportName = '', timeoutMs = 10_000): Promise<NbdClient> {
    const socket = connect(socketPath);
    const reader = new HandshakeReader(socket);
    const timer = setTimeout(() => socket.destroy(new Error(`NBD handshake with ${socketPath} timed out`)), timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
      const greeting = await reader.next((buf) => {
        const g = decodeServerGreeting(buf);
        return g ? { value: g, size: 18 } : undefined;
      });
      if ((greeting.handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE) === 0) {
        throw new VmmFailure('NBD_HANDSHAKE', `NBD server at ${socketPath} does not offer fixed newstyle`);
      }
      const noZeroes = (greeting.handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
      socket.write(encodeClientFlags(ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0)));
      socket.write(encodeOptionRequest(Option.GO, encodeInfoRequest(exportName, [InfoType.BLOCK_SIZE])));
      let size: number | undefined;
      let flags = 0;
      for (;;) {
        const reply = await reader.next((buf) => {
          const r = decodeOptionReply(buf);
          return r ? { value: r, size: r.size } : undefined;
        });
        if (isOptionReplyError(reply.type)) {
          throw new VmmFailure(
            'NBD_HANDSHAKE',
            `NBD server at ${socketPath} refused export "${exportName}": reply 0x${reply.type.toString(16)} ${reply.data.toString('utf8')}`,
          );
        }
        if (reply.type === OptionReply.INFO) {
          const info = decodeInfo(reply.data);
          if (info.type === 'export') {
            size = info.size;
            flags = info.transmissionFlags;
          }
        } else if (reply.type === OptionReply.ACK) {
          break;
        }
      }
      if (size === undefined) throw new VmmFailure('NBD_HANDSHAKE', `NBD server at ${socketPath} sent no export size`);
      const leftover = reader.detach();
      const client = new NbdClient(socket, size, flags);
      if (leftover.length > 0) client.onData(leftover);
      return client;
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** The connection failed (server gone, reset, protocol error): no request can succeed on it. */
  get broken(): boolean {
    return this.failure !== undefined;
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & TransmissionFlag.READ_ONLY) !== 0;
  }

  async readAt(target: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, target.length);
    if (target.length === 0) return;
    await this.request(Command.READ, 0, offset, target.length, undefined, target);
  }

  async writeAt(source: Uint8Array, offset: number, fua = false): Promise<void> {
    this.checkRange(offset, source.length);
    if (source.length === 0) return;
    await this.request(Command.WRITE, fua ? CommandFlag.FUA : 0, offset, source.length, source);
  }

  async zeroAt(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    if ((this.transmissionFlags & TransmissionFlag.SEND_WRITE_ZEROES) !== 0) {
      await this.request(Command.WRITE_ZEROES, 0, offset, length);
    } else {
      await this.writeAt(new Uint8Array(length), offset);
    }
  }

  async flush(): Promise<void> {
    if ((this.transmissionFlags & TransmissionFlag.SEND_FLUSH) === 0) return;
    await this.request(Command.FLUSH, 0, 0, 0);
  }

  /** Sends NBD_CMD_DISC once the requests in flight are answered, then closes. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.pending.values()].map((p) => p.done));
    if (!this.failure && !this.socket.destroyed) {
      const header = encodeRequestHeader({ flags: 0, type: Command.DISC, cookie: 0n, offset: 0, length: 0 });
      await new Promise<void>((resolve) => this.socket.end(header, resolve));
    }
    this.socket.destroy();
  }

  private checkRange(offset: number, length: number): void {
    if (this.closed) throw new VmmFailure('NBD_CLOSED', 'NBD client is closed');
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`NBD range [${offset}, ${offset + length}) outside device of ${this.size} bytes`);
    }
  }

  private request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Uint8Array,
    target?: Uint8Array,
  ): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const cookie = this.nextCookie++;
    let settle!: { resolve: () => void; reject: (e: Error) => void };
    const done = new Promise<void>((resolve, reject) => {
      settle = { resolve, reject };
    });
    this.pending.set(cookie, { type, offset, length, target, ...settle, done: done.catch(() => undefined) });
    const header = encodeRequestHeader({ flags, type, cookie, offset, length }, Buffer.alloc(REQUEST_HEADER_SIZE));
    this.socket.write(header);
    if (payload) this.socket.write(payload);
    return done;
  }

  private onData(chunk: Buffer): void {
    this.inbox = this.inbox.length === 0 ? chunk : Buffer.concat([this.inbox, chunk]);
    try {
      while (this.inbox.length >= SIMPLE_REPLY_HEADER_SIZE) {
        const header = decodeSimpleReplyHeader(this.inbox);
        const entry = this.pending.get(header.cookie);
        if (!entry) {
          throw new VmmFailure('NBD_PROTOCOL', `NBD reply for unknown cookie ${header.cookie}`);
        }
        const dataBytes = entry.type === Command.READ && header.error === 0 ? entry.length : 0;
        if (this.inbox.length < SIMPLE_REPLY_HEADER_SIZE + dataBytes) return;
        if (dataBytes > 0 && entry.target) {
          entry.target.set(this.inbox.subarray(SIMPLE_REPLY_HEADER_SIZE, SIMPLE_REPLY_HEADER_SIZE + dataBytes));
        }
        this.inbox = this.inbox.subarray(SIMPLE_REPLY_HEADER_SIZE + dataBytes);
        this.pending.delete(header.cookie);
        if (header.error === 0) entry.resolve();
        else {
          entry.reject(
            new VmmFailure('NBD_IO_ERROR', `NBD request failed with errno ${header.error}`, {
              errno: header.error,
              offset: entry.offset,
              length: entry.length,
              command: entry.type,
            }),
          );
        }
      }
    } catch (err) {
      this.fail(err as Error);
      this.socket.destroy();
    }
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    for (const entry of this.pending.values()) entry.reject(this.failure);
    this.pending.clear();
  }
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  target: Uint8Array | undefined;
  resolve: () => void;
  reject: (e: Error) => void;
  done: Promise<void>;
}

/** Buffers handshake bytes until a decoder recognises a whole message. */
class HandshakeReader {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  private error: Error | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.buf = Buffer.concat([this.buf, chunk]);
    this.wake?.();
  };
  private readonly onEnd = (err?: Error) => {
    this.error = err ?? new VmmFailure('NBD_HANDSHAKE', 'NBD server closed the connection during the handshake');
    this.wake?.();
  };
  private readonly onClose = () => this.onEnd();

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('error', this.onEnd);
    socket.on('close', this.onClose);
  }

  async next<T>(decode: (buf: Buffer) => { value: T; size: number } | undefined): Promise<T> {
    for (;;) {
      const got = decode(this.buf);
      if (got) {
        this.buf = this.buf.subarray(got.size);
        return got.value;
      }
      if (this.error) throw this.error;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = undefined;
    }
  }

  detach(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.off('error', this.onEnd);
    this.socket.off('close', this.onClose);
    return this.buf;
  }
}
