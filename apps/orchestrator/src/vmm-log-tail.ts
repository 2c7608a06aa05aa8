import { watch, type FSWatcher } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import type { Logger } from '#logging';
import { pollingRound } from './polling-round.js';

/**
 * Follows a VMM's stdout or stderr file into the sandbox's logger. The VMM writes to a file,
 * not a pipe, so it outlives an orchestrator crash without dying of SIGPIPE and the restarted
 * orchestrator picks the log up where the file is. It reads when the file changes (inotify),
 * not on a timer: a node with hundreds of quiet VMMs must not open hundreds of files a second.
 * Only a tail whose watch could not be set (no file yet, watch failed) is read on a timer, and
 * those share one round per interval (polling-round.ts): no timer per sandbox; it takes the
 * watch as soon as it can.
 */
export class VmmLogTail {
  private position = 0;
  private partial = '';
  private started = false;
  /** Leaves the shared round; set while this tail is read on the timer instead of a watch. */
  private leaveRound: (() => void) | undefined;
  private watcher: FSWatcher | undefined;
  /** The read running now; a change seen meanwhile reads again after it. */
  private current: Promise<void> | undefined;
  private again = false;

  constructor(
    private path: string,
    private logger: Logger,
    private readonly stream: 'stdout' | 'stderr',
    private readonly intervalMs = 5000,
  ) {}

  /**
   * The file was renamed to `path` (a pooled VMM handed to a sandbox): the same file, so the
   * watch holds and reading goes on where it was; lines read from now on go to `logger`, the
   * file's earlier lines having moved with it.
   */
  moveTo(path: string, logger: Logger): void {
    this.path = path;
    this.logger = logger;
  }

  start(fromEnd = false): void {
    if (this.started) return;
    this.started = true;
    if (fromEnd) {
      void open(this.path, 'r')
        .then(async (fh) => {
          this.position = (await fh.stat()).size;
          await fh.close();
        })
        .catch(() => undefined);
    }
    if (!this.tryWatch()) this.leaveRound = pollingRound(this.intervalMs).add(() => this.roundPoll());
    // What was written before the watch was set raises no notice: read it now.
    else if (!fromEnd) void this.poll();
  }

  /** Follows the file on change notices; false when no watch could be set (no file yet, no inotify). */
  private tryWatch(): boolean {
    try {
      this.watcher = watch(this.path, { persistent: false }, () => void this.poll());
      this.watcher.on('error', () => {
        this.unwatch();
        if (this.started && !this.leaveRound)
          this.leaveRound = pollingRound(this.intervalMs).add(() => this.roundPoll());
      });
      return true;
    } catch {
      return false;
    }
  }

  /** A turn of the shared round: read, and move to a watch once one can be set. */
  private async roundPoll(): Promise<void> {
    await this.poll();
    if (this.started && !this.watcher && this.tryWatch()) {
      this.leaveRound?.();
      this.leaveRound = undefined;
    }
  }

  private unwatch(): void {
    this.watcher?.close();
    this.watcher = undefined;
  }

  /** Reads what is left and stops. */
  async stop(): Promise<void> {
    this.started = false;
    this.leaveRound?.();
    this.leaveRound = undefined;
    this.unwatch();
    await this.current;
    await this.poll();
    if (this.partial) this.emit(this.partial);
    this.partial = '';
  }

  private poll(): Promise<void> {
    if (this.current) {
      this.again = true;
      return this.current;
    }
    this.again = false;
    this.current = this.read().finally(() => {
      this.current = undefined;
      if (this.again && this.started) void this.poll();
    });
    return this.current;
  }

  private async read(): Promise<void> {
    let fh: FileHandle | undefined;
    try {
      fh = await open(this.path, 'r');
      const buf = Buffer.alloc(64 * 1024);
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, this.position);
        if (bytesRead === 0) break;
        this.position += bytesRead;
        const text = this.partial + buf.subarray(0, bytesRead).toString('utf8');
        const lines = text.split('\n');
        this.partial = lines.pop() ?? '';
        for (const line of lines) if (line) this.emit(line);
      }
    } catch {
      // The file is gone once the sandbox directory is removed; nothing more to follow.
    } finally {
      await fh?.close().catch(() => undefined);
    }
  }

  private emit(line: string): void {
    if (this.stream === 'stderr') this.logger.warn({ stream: 'vmm-stderr' }, line);
    else this.logger.info({ stream: 'vmm-stdout' }, line);
  }
}
