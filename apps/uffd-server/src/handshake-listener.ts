import { lstatSync, unlinkSync } from 'node:fs';
import { accept, close, listenUnix, MSG_DONTWAIT, peerCredentials, receiveWithFds, watchReadable } from '#native';
import { HandshakeInvalid, parseHandshake, type Handshake } from '#uffd';
import { HandshakeTimeout } from './uffd-server-errors.js';

/** What Firecracker handed over: the regions, the uffd, maybe the memfd, and who sent it. */
export interface ReceivedHandshake extends Handshake {
  uffd: number;
  memfd: number | undefined;
  /** The accepted connection (kept open: its hang-up is one way to see the peer go). */
  connection: number;
  peerPid: number | undefined;
}

const MAX_PAYLOAD = 64 * 1024;
/** Room for more fds than allowed, so "too many" is seen (and the extras closed), not silently cut. */
const MAX_FDS = 8;

function removeStaleSocket(path: string): void {
  try {
    const st = lstatSync(path);
    if (!st.isSocket()) throw new Error(`${path} exists and is not a socket`);
    unlinkSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}

/**
 * Listens on a sandbox's uffd socket for exactly one Firecracker handshake, on the event loop
 * (non-blocking accept and receive via libuv polling). The socket file is removed once the
 * handshake arrived or the wait was cancelled. Bad handshakes reject with HandshakeInvalid and
 * every fd received with them is closed.
 */
export class HandshakeListener {
  readonly socketPath: string;
  private listenFd: number;
  private connFd = -1;
  private watch: { close(): void } | undefined;
  private timer: NodeJS.Timeout | undefined;
  private settle: ((err: Error | undefined, value?: ReceivedHandshake) => void) | undefined;
  readonly received: Promise<ReceivedHandshake>;

  constructor(
    socketPath: string,
    options: { memorySize: number; pageSize?: number; blockSize?: number; timeoutMs?: number },
  ) {
    this.socketPath = socketPath;
    removeStaleSocket(socketPath);
    this.listenFd = listenUnix(socketPath, { backlog: 4, nonBlocking: true });
    this.received = new Promise<ReceivedHandshake>((resolve, reject) => {
      this.settle = (err, value) => {
        this.settle = undefined;
        this.release(err !== undefined);
        if (err) reject(err);
        else resolve(value!);
      };
    });
    // Callers may never await (a sandbox stopped before Firecracker came): avoid an unhandled rejection.
    this.received.catch(() => undefined);
    if (options.timeoutMs)
      this.timer = setTimeout(
        () => this.settle?.(new HandshakeTimeout(socketPath, options.timeoutMs!)),
        options.timeoutMs,
      );
    this.watch = watchReadable(this.listenFd, () => this.onAcceptable(options));
  }

  private onAcceptable(options: { memorySize: number; pageSize?: number; blockSize?: number }): void {
    if (this.connFd >= 0 || !this.settle) return;
    let fd: number;
    try {
      fd = accept(this.listenFd, true);
    } catch (err) {
      this.settle(err as Error);
      return;
    }
    if (fd < 0) return;
    this.connFd = fd;
    this.watch?.close();
    this.watch = watchReadable(fd, () => this.onReadable(options));
  }

  private onReadable(options: { memorySize: number; pageSize?: number; blockSize?: number }): void {
    if (!this.settle) return;
    let msg;
    try {
      msg = receiveWithFds(this.connFd, MAX_PAYLOAD, MAX_FDS, MSG_DONTWAIT);
    } catch (err) {
      this.settle(err as Error);
      return;
    }
    if (msg === null) return;
    if (msg.payload.length === 0 && msg.fds.length === 0) {
      this.settle(new HandshakeInvalid('TRUNCATED', 'the peer closed the connection before sending the handshake'));
      return;
    }
    try {
      const hs = parseHandshake(msg.payload, {
        fdCount: msg.fdsSent,
        truncated: msg.truncated || msg.controlTruncated,
        memorySize: options.memorySize,
        ...(options.pageSize ? { pageSize: options.pageSize } : {}),
        ...(options.blockSize ? { blockSize: options.blockSize } : {}),
      });
      let peerPid: number | undefined;
      try {
        peerPid = peerCredentials(this.connFd).pid || undefined;
      } catch {
        peerPid = undefined;
      }
      const connection = this.connFd;
      this.connFd = -1; // handed over to the caller
      this.settle(undefined, { ...hs, uffd: msg.fds[0]!, memfd: msg.fds[1], connection, peerPid });
    } catch (err) {
      for (const fd of msg.fds) close(fd);
      this.settle(err as Error);
    }
  }

  /** Stops waiting (the sandbox was stopped before Firecracker came). */
  cancel(reason: Error): void {
    this.settle?.(reason);
  }

  private release(failed: boolean): void {
    if (this.timer) clearTimeout(this.timer);
    this.watch?.close();
    this.watch = undefined;
    if (this.listenFd >= 0) {
      close(this.listenFd);
      this.listenFd = -1;
      try {
        unlinkSync(this.socketPath);
      } catch {
        // already gone
      }
    }
    if (failed && this.connFd >= 0) {
      close(this.connFd);
      this.connFd = -1;
    }
  }
}
