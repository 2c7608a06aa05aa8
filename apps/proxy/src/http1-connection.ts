import type { Socket } from 'node:net';
import type { SandboxRoute } from '#proto/sbx/routing';
import { TOKEN_HEADER } from './access-token.js';
import { BodyFraming, Framing } from './body-framing.js';
import { rawErrorResponse } from './error-response.js';
import { forwardRequestHead } from './forward-headers.js';
import type { Http1Forwarder } from './http1-forwarder.js';
import {
  headEnd,
  headerValue,
  HeadInvalid,
  leadingBlankLines,
  parseRequestHead,
  parseResponseHead,
  persistent,
  type RequestHead,
} from './http1-head.js';
import { ProxyError, UpstreamFailed } from './proxy-errors.js';
import { routeTarget, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, type RouteTarget } from './route-target.js';
import type { Upstream, UpstreamUser } from './upstream-pool.js';

const enum Phase {
  /** Reading a request head. */
  Head,
  /** Waiting for the route (the orchestrator is asked: a resume, a sandbox starting). */
  Resolving,
  /** Passing (or discarding) the request body; the response may come meanwhile. */
  Body,
  /** The request is sent; the response is still coming. */
  Waiting,
  /** After 101 Switching Protocols: bytes both ways, nothing parsed. */
  Tunnel,
  Closed,
}

const enum Response {
  Head,
  Body,
  Done,
}

// Client bytes read ahead of the exchange in progress (pipelined requests) before reading pauses.
const MAX_READ_AHEAD = 64 * 1024;

const EMPTY = Buffer.alloc(0);

const REASONS: Record<number, string> = {
  405: 'Method Not Allowed',
  431: 'Request Header Fields Too Large',
  501: 'Not Implemented',
  505: 'HTTP Version Not Supported',
};

/**
 * One client connection speaking HTTP/1.1 through the proxy. Only heads are parsed: each
 * request head is checked, routed (per request: a keep-alive client may reach several
 * sandboxes) and rewritten (Host masking, token and routing headers removed, X-Forwarded-*),
 * then body bytes pass through unchanged both ways, followed only as far as their framing says
 * where they end, so that the upstream connection can go back to its pool and the next
 * request (pipelined or not) can be routed on its own. Exchanges are strictly in order: a
 * pipelined request waits, read but not parsed, until the previous response has ended.
 */
export class Http1Connection implements UpstreamUser {
  private phase = Phase.Head;
  private pending: Buffer | undefined;
  private paused = false;
  private clientEnded = false;
  private readonly clientAddress: string | undefined;

  private head: RequestHead | undefined;
  private target: RouteTarget | undefined;
  private readonly requestBody = new BodyFraming();
  private readonly responseBody = new BodyFraming();
  /** Request bytes go to the upstream, or nowhere (a refused request, or one answered early). */
  private discardBody = false;
  private requestDone = false;
  private response = Response.Head;
  private responseHead: Buffer | undefined;
  /** A byte of an answer reached the client: a failure now can only cut the connection. */
  private answered = false;
  private reusable = false;
  private closeAfter = false;
  private upgrade = false;
  private up: Upstream | undefined;
  private headText = '';
  private retried = false;
  private reusedUpstream = false;
  private hostIp = '';
  private started = 0;
  /** No client write from an upstream's read buffer is still queued (that buffer is free). */
  private flushed = true;

  constructor(
    private readonly client: Socket,
    private readonly f: Http1Forwarder,
    first: Buffer,
  ) {
    this.clientAddress = client.remoteAddress?.replace(/^::ffff:/, '');
    client.on('data', (chunk: Buffer) => this.clientData(chunk));
    client.on('end', () => this.clientEnd());
    client.on('drain', () => this.clientDrain());
    client.on('close', () => this.clientClose());
    client.setTimeout(f.idleTimeoutMs, () => {
      // Idle between requests (or stuck in a head): closed. An exchange or tunnel in progress is not idle.
      if (this.phase === Phase.Head) client.destroy();
    });
    this.clientData(first);
  }

  // ---- client side ----

  private clientData(chunk: Buffer): void {
    switch (this.phase) {
      case Phase.Head:
        this.pending = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
        this.nextRequest();
        return;
      case Phase.Body:
        this.requestBytes(chunk);
        return;
      case Phase.Tunnel:
        // The guest's side may be gone already (it ended, we ended the client): nothing to carry.
        if (this.up && !this.up.socket.write(chunk)) this.pauseClient();
        return;
      case Phase.Closed:
        return;
      default:
        this.readAhead(chunk);
    }
  }

  private readAhead(chunk: Buffer): void {
    this.pending = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    if (this.pending.length > MAX_READ_AHEAD) this.pauseClient();
  }

  private pauseClient(): void {
    if (this.paused) return;
    this.paused = true;
    this.client.pause();
  }

  private resumeClient(): void {
    if (!this.paused) return;
    this.paused = false;
    this.client.resume();
  }

  private clientEnd(): void {
    this.clientEnded = true;
    if (this.phase === Phase.Tunnel) this.up?.socket.end();
    else if (this.phase === Phase.Head) this.finish();
    else if (this.phase === Phase.Body && !this.requestDone) {
      // The body was cut short: the request cannot complete.
      this.destroy();
    }
    // Otherwise the answer still goes out (half-open), then the connection ends.
  }

  private clientDrain(): void {
    // Upstream reading resumes when the write holding its read buffer is done (onFlushed).
    if (this.flushed && this.up && this.up.user === this) this.up.socket.resume();
  }

  private clientClose(): void {
    const up = this.up;
    const tunnel = this.phase === Phase.Tunnel;
    this.phase = Phase.Closed;
    this.up = undefined;
    this.pending = undefined;
    if (!up) return;
    up.user = undefined;
    // A tunnel side that ended cleanly lets the other finish writing what it has queued.
    if (tunnel && up.socket.writableEnded) return;
    up.socket.destroy();
  }

  /** Parses the next request head from what was read, if it is whole. */
  private nextRequest(): void {
    let buf = this.pending;
    if (!buf) return;
    const skip = leadingBlankLines(buf);
    if (skip) {
      buf = buf.subarray(skip);
      if (!buf.length) {
        this.pending = undefined;
        return;
      }
    }
    let head: RequestHead;
    try {
      const end = headEnd(buf);
      if (end < 0) {
        this.pending = buf;
        return;
      }
      head = parseRequestHead(buf, end);
      if (head.method === 'CONNECT') throw new HeadInvalid('CONNECT is not served here', 405);
    } catch (err) {
      this.badRequest(err as HeadInvalid);
      return;
    }
    this.pending = head.length < buf.length ? buf.subarray(head.length) : undefined;
    this.request(head);
  }

  private request(head: RequestHead): void {
    this.head = head;
    this.started = performance.now();
    this.requestBody.start(
      head.chunked ? Framing.Chunked : head.contentLength > 0 ? Framing.Length : Framing.None,
      head.contentLength,
    );
    this.requestDone = this.requestBody.done;
    this.discardBody = false;
    this.response = Response.Head;
    this.answered = false;
    this.retried = false;
    this.closeAfter = !persistent(head);
    this.upgrade = head.connection.includes('upgrade') && head.keys.includes('upgrade');
    let route: SandboxRoute | undefined;
    try {
      this.target = routeTarget(
        headerValue(head, 'host'),
        headerValue(head, SANDBOX_ID_HEADER),
        headerValue(head, SANDBOX_PORT_HEADER),
      );
      route = this.f.resolver.resolveNow(this.target, headerValue(head, TOKEN_HEADER));
    } catch (err) {
      this.refuse(err);
      return;
    }
    if (route) {
      this.forward(route);
      return;
    }
    // The orchestrator must be asked (a create that just returned, a resume): read ahead meanwhile.
    this.phase = Phase.Resolving;
    const target = this.target;
    this.f.resolver.resolve(target, headerValue(head, TOKEN_HEADER)).then(
      (r) => {
        if (this.phase === Phase.Resolving && this.head === head) this.forward(r);
      },
      (err: unknown) => {
        if (this.phase === Phase.Resolving && this.head === head) this.refuse(err);
      },
    );
  }

  private forward(route: SandboxRoute): void {
    const head = this.head!;
    this.headText = forwardRequestHead(head, {
      maskHost: route.maskRequestHost,
      clientAddress: this.clientAddress,
      upgrade: this.upgrade,
      close: this.closeAfter,
    });
    const up = this.f.pool.take(route.hostIp, this.target!.port, this);
    this.up = up;
    this.hostIp = route.hostIp;
    this.reusedUpstream = up.reused;
    const body = this.requestDone ? undefined : this.pending;
    if (body) {
      this.pending = undefined;
      this.phase = Phase.Body;
      // Head and the first body bytes in one write.
      up.socket.cork();
      up.socket.write(this.headText, 'latin1');
      this.requestBytes(body);
      up.socket.uncork();
    } else {
      up.socket.write(this.headText, 'latin1');
      this.phase = this.requestDone ? Phase.Waiting : Phase.Body;
    }
    this.resumeClient();
  }

  /** Body bytes of the current request; what follows its end is the next request, read ahead. */
  private requestBytes(chunk: Buffer): void {
    let end: number;
    try {
      end = this.requestBody.advance(chunk, 0);
    } catch (err) {
      this.badRequest(err as HeadInvalid);
      return;
    }
    if (!this.discardBody && end > 0) {
      const part = end === chunk.length ? chunk : chunk.subarray(0, end);
      if (!this.up!.socket.write(part)) this.pauseClient();
    }
    if (!this.requestBody.done) return;
    this.requestDone = true;
    this.phase = Phase.Waiting;
    if (end < chunk.length) this.readAhead(chunk.subarray(end));
    if (this.response === Response.Done) this.exchangeDone();
  }

  // ---- upstream side ----

  upstreamData(chunk: Buffer): boolean {
    if (this.phase === Phase.Tunnel) return this.toClient(chunk);
    let buf = chunk;
    let from = 0;
    if (this.response === Response.Head) {
      buf = this.responseHead ? Buffer.concat([this.responseHead, chunk]) : chunk;
      this.responseHead = undefined;
      from = this.responseHeadFrom(buf);
      if (from < 0) return this.flushed;
    }
    if (this.response !== Response.Body) {
      // Bytes after a complete response: the guest broke framing; this connection is not reused.
      this.reusable = false;
      return true;
    }
    let end: number;
    try {
      end = this.responseBody.advance(buf, from);
    } catch {
      // Broken chunked framing from the guest, after the head went out: only a cut is left.
      this.destroy();
      return false;
    }
    const more = this.toClient(end === buf.length ? buf : buf.subarray(0, end));
    if (end < buf.length) this.reusable = false;
    if (this.responseBody.done) this.responseDone();
    return more;
  }

  /**
   * Writes bytes from the upstream's read buffer to the client. When part of them stays queued
   * the buffer is still in use: reading the upstream pauses (false) until that write is done.
   */
  private toClient(part: Buffer): boolean {
    if (!part.length) return true;
    this.client.write(part);
    if (this.client.writableLength === 0) return true;
    this.flushed = false;
    this.client.write(EMPTY, this.onFlushed);
    return false;
  }

  private readonly onFlushed = () => {
    this.flushed = true;
    const up = this.up;
    if (up && up.user === this) up.socket.resume();
  };

  /**
   * Reads response heads at the start of `buf` (interim 1xx ones are passed on); returns where
   * the final response's body starts, or -1 when more bytes are needed or the exchange moved on.
   */
  private responseHeadFrom(buf: Buffer): number {
    let from = 0;
    for (;;) {
      const rest = from ? buf.subarray(from) : buf;
      let end: number;
      let status: number;
      let head;
      try {
        end = headEnd(rest);
        if (end < 0) {
          if (from) this.toClient(buf.subarray(0, from));
          // Kept past this read: a copy, the read buffer is reused.
          this.responseHead = Buffer.from(rest);
          return -1;
        }
        head = parseResponseHead(rest, end);
        status = head.status;
      } catch (err) {
        this.upstreamFailed(new UpstreamFailed(this.target!.sandboxId, this.target!.port, (err as Error).message));
        return -1;
      }
      if (status === 101) {
        if (!this.upgrade) {
          this.upstreamFailed(new UpstreamFailed(this.target!.sandboxId, this.target!.port, '101 without Upgrade'));
          return -1;
        }
        this.tunnel(buf);
        return -1;
      }
      if (status >= 100 && status < 200) {
        // 100 Continue and the like: on to the client, the final response follows.
        this.answered = true;
        from += end;
        continue;
      }
      const m = this.head!.method;
      const framing =
        m === 'HEAD' || status === 204 || status === 304
          ? Framing.None
          : head.chunked
            ? Framing.Chunked
            : head.untilClose || head.contentLength < 0
              ? Framing.UntilClose
              : Framing.Length;
      this.responseBody.start(framing, head.contentLength);
      this.reusable = persistent(head) && framing !== Framing.UntilClose;
      if (!persistent(head) || framing === Framing.UntilClose) this.closeAfter = true;
      this.response = Response.Body;
      this.answered = true;
      this.f.responded(this.started);
      return from + end;
    }
  }

  private tunnel(buf: Buffer): void {
    this.phase = Phase.Tunnel;
    this.answered = true;
    this.f.upgraded(this.client);
    this.toClient(buf);
    this.client.setTimeout(0);
    const ahead = this.pending;
    this.pending = undefined;
    if (ahead) this.up!.socket.write(ahead);
    this.resumeClient();
    if (this.clientEnded) this.up!.socket.end();
  }

  private responseDone(): void {
    this.response = Response.Done;
    if (!this.requestDone) {
      // Answered before the whole body came (413, say): the rest of the body is read and dropped,
      // and the upstream connection, which saw only part of the request, is closed.
      this.discardBody = true;
      this.reusable = false;
      this.phase = Phase.Body;
      this.releaseUpstream();
      return;
    }
    this.exchangeDone();
  }

  upstreamEnd(): void {
    if (this.phase === Phase.Tunnel) {
      this.client.end();
      return;
    }
    if (this.response === Response.Body && this.responseBody.untilClose) {
      this.reusable = false;
      this.closeAfter = true;
      this.responseDone();
      return;
    }
    this.up?.socket.destroy();
  }

  upstreamDrain(): void {
    this.resumeClient();
  }

  upstreamClose(err: NodeJS.ErrnoException | undefined): void {
    this.up = undefined;
    if (this.phase === Phase.Closed) return;
    if (this.phase === Phase.Tunnel) {
      if (!this.client.writableEnded) this.client.destroy();
      return;
    }
    if (this.response === Response.Done) return;
    // A pooled connection the guest had closed while idle: a request without a body goes again.
    if (this.response === Response.Head && !this.answered && this.reusedUpstream && !this.retried) {
      const bodiless = this.head!.contentLength <= 0 && !this.head!.chunked;
      if (bodiless && (!err || err.code === 'ECONNRESET' || err.code === 'EPIPE')) {
        this.retried = true;
        this.reusedUpstream = false;
        this.up = this.f.pool.take(this.hostIp, this.target!.port, this);
        this.up.socket.write(this.headText, 'latin1');
        return;
      }
    }
    this.upstreamFailed(this.f.upstreamError(err, this.target!));
  }

  private upstreamFailed(e: ProxyError): void {
    if (this.up) {
      this.up.user = undefined;
      this.up.socket.destroy();
      this.up = undefined;
    }
    if (this.answered) {
      this.destroy();
      return;
    }
    this.refuse(e);
  }

  private releaseUpstream(): void {
    const up = this.up;
    if (!up) return;
    this.up = undefined;
    // A write still queued from its read buffer: the next request's answer must not overwrite it.
    if (this.reusable && this.flushed) this.f.pool.release(up);
    else {
      up.user = undefined;
      up.socket.destroy();
    }
  }

  private exchangeDone(): void {
    this.releaseUpstream();
    this.head = undefined;
    this.answered = false;
    if (this.closeAfter || this.clientEnded) {
      this.finish();
      return;
    }
    this.phase = Phase.Head;
    this.resumeClient();
    if (this.pending) this.nextRequest();
  }

  // ---- answers from the proxy itself ----

  /** A refusal as its JSON answer; the connection stays usable once the request body is read. */
  private refuse(err: unknown): void {
    const e = err instanceof ProxyError ? err : new UpstreamFailed(this.target?.sandboxId ?? '', 0, String(err));
    this.f.refused(e, this.upgrade);
    if (this.upgrade) {
      this.phase = Phase.Closed;
      this.client.end(rawErrorResponse(e));
      return;
    }
    this.client.write(rawErrorResponse(e, this.closeAfter));
    this.answered = true;
    this.response = Response.Done;
    this.reusable = false;
    if (this.requestDone) {
      this.exchangeDone();
      return;
    }
    this.discardBody = true;
    this.phase = Phase.Body;
    const ahead = this.pending;
    this.pending = undefined;
    if (ahead) this.requestBytes(ahead);
    this.resumeClient();
  }

  /** A request that cannot be read: answered, then the connection is closed (nothing after it can be trusted). */
  private badRequest(err: HeadInvalid): void {
    if (this.answered || !(err instanceof HeadInvalid)) {
      this.destroy();
      return;
    }
    const body = JSON.stringify({ code: 'BAD_REQUEST', message: err.message }) + '\n';
    this.f.badRequest();
    this.phase = Phase.Closed;
    this.pending = undefined;
    this.releaseUpstreamHard();
    this.client.end(
      `HTTP/1.1 ${err.status} ${REASONS[err.status] ?? 'Bad Request'}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n` +
        `connection: close\r\n\r\n${body}`,
    );
  }

  private releaseUpstreamHard(): void {
    if (!this.up) return;
    this.up.user = undefined;
    this.up.socket.destroy();
    this.up = undefined;
  }

  /** Ends the client connection after what was written. */
  private finish(): void {
    this.phase = Phase.Closed;
    this.releaseUpstreamHard();
    this.client.end();
  }

  private destroy(): void {
    this.phase = Phase.Closed;
    this.releaseUpstreamHard();
    this.client.destroy();
  }
}
