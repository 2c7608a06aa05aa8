import { HeadInvalid } from './http1-head.js';

/** How a message body ends (RFC 9112 §6.3). */
export enum Framing {
  None,
  Length,
  Chunked,
  /** Read until the connection closes (a response without length). */
  UntilClose,
}

const enum Chunk {
  Size,
  Extension,
  SizeLf,
  Data,
  DataCr,
  DataLf,
  TrailerStart,
  Trailer,
  TrailerLf,
  EndLf,
  Done,
}

// Chunk-size lines and trailers are scanned, never kept; bound them anyway.
const MAX_LINE = 8 * 1024;
const MAX_SIZE_DIGITS = 12; // < 2^48 bytes per chunk

/**
 * Finds where a body ends in the bytes that pass through, without copying or changing them:
 * a length counted down, or chunked framing followed through its size lines, data, CRLFs and
 * trailers. The proxy needs this only to know when a connection is free for the next message.
 */
export class BodyFraming {
  private mode = Framing.None;
  private remaining = 0;
  private state = Chunk.Size;
  private digits = 0;
  private lineBytes = 0;

  get done(): boolean {
    if (this.mode === Framing.Length) return this.remaining === 0;
    if (this.mode === Framing.Chunked) return this.state === Chunk.Done;
    return this.mode === Framing.None;
  }

  get untilClose(): boolean {
    return this.mode === Framing.UntilClose;
  }

  start(mode: Framing, length = 0): void {
    this.mode = mode === Framing.Length && length === 0 ? Framing.None : mode;
    this.remaining = mode === Framing.Length ? length : 0;
    this.state = Chunk.Size;
    this.digits = 0;
    this.lineBytes = 0;
  }

  /**
   * Consumes body bytes from `buf[from..]`; returns the index just past the body's last byte in
   * this buffer (buf.length when the body goes on). Throws HeadInvalid for broken chunked framing.
   */
  advance(buf: Buffer, from: number): number {
    if (this.mode === Framing.None) return from;
    if (this.mode === Framing.UntilClose) return buf.length;
    if (this.mode === Framing.Length) {
      const take = Math.min(this.remaining, buf.length - from);
      this.remaining -= take;
      return from + take;
    }
    return this.chunked(buf, from);
  }

  private chunked(buf: Buffer, from: number): number {
    let i = from;
    const n = buf.length;
    while (i < n) {
      const c = buf[i]!;
      switch (this.state) {
        case Chunk.Size: {
          const v = hex(c);
          if (v >= 0) {
            if (++this.digits > MAX_SIZE_DIGITS) throw new HeadInvalid('chunk size too large');
            this.remaining = this.remaining * 16 + v;
            i++;
            break;
          }
          if (this.digits === 0) throw new HeadInvalid('malformed chunk size');
          if (c === 13) this.state = Chunk.SizeLf;
          else if (c === 59 || c === 32 || c === 9) this.state = Chunk.Extension;
          else throw new HeadInvalid('malformed chunk size');
          this.lineBytes = this.digits;
          i++;
          break;
        }
        case Chunk.Extension:
          if (c === 13) this.state = Chunk.SizeLf;
          else if (c === 10 || (c < 32 && c !== 9) || c === 127) throw new HeadInvalid('malformed chunk extension');
          else if (++this.lineBytes > MAX_LINE) throw new HeadInvalid('chunk extension too long');
          i++;
          break;
        case Chunk.SizeLf:
          if (c !== 10) throw new HeadInvalid('chunk size line without CRLF');
          i++;
          this.digits = 0;
          this.state = this.remaining === 0 ? Chunk.TrailerStart : Chunk.Data;
          break;
        case Chunk.Data: {
          const take = Math.min(this.remaining, n - i);
          this.remaining -= take;
          i += take;
          if (this.remaining === 0) this.state = Chunk.DataCr;
          break;
        }
        case Chunk.DataCr:
          if (c !== 13) throw new HeadInvalid('chunk data longer than its size');
          this.state = Chunk.DataLf;
          i++;
          break;
        case Chunk.DataLf:
          if (c !== 10) throw new HeadInvalid('chunk data without CRLF');
          this.state = Chunk.Size;
          i++;
          break;
        case Chunk.TrailerStart:
          this.lineBytes = 0;
          if (c === 13) this.state = Chunk.EndLf;
          else if (c === 10) throw new HeadInvalid('bare LF in trailers');
          else this.state = Chunk.Trailer;
          i++;
          break;
        case Chunk.Trailer:
          if (c === 13) this.state = Chunk.TrailerLf;
          else if (c === 10 || (c < 32 && c !== 9) || c === 127) throw new HeadInvalid('malformed trailer');
          else if (++this.lineBytes > MAX_LINE) throw new HeadInvalid('trailer too long');
          i++;
          break;
        case Chunk.TrailerLf:
          if (c !== 10) throw new HeadInvalid('trailer without CRLF');
          this.state = Chunk.TrailerStart;
          i++;
          break;
        case Chunk.EndLf:
          if (c !== 10) throw new HeadInvalid('chunked body without final CRLF');
          this.state = Chunk.Done;
          return i + 1;
        case Chunk.Done:
          return i;
      }
    }
    return i;
  }
}

function hex(c: number): number {
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 97 && c <= 102) return c - 87;
  if (c >= 65 && c <= 70) return c - 55;
  return -1;
}
