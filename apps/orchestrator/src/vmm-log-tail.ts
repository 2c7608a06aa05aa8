import { open, type FileHandle } from 'node:fs/promises';
import type { Logger } from '#logging';

/**
 * Follows a VMM's stdout or stderr file into the sandbox's logger. The VMM writes to a file,
 * not a pipe, so it outlives an orchestrator crash without dying of SIGPIPE and the restarted
 * orchestrator picks the log up where the file is.
 */
export class VmmLogTail {
  private position = 0;
  private partial = '';
  private timer: NodeJS.Timeout | undefined;
  private reading = false;

  constructor(
    private readonly path: string,
    private readonly logger: Logger,
    private readonly stream: 'stdout' | 'stderr',
    private readonly intervalMs = 300,
  ) {}

  start(fromEnd = false): void {
    if (this.timer) return;
    if (fromEnd) {
      void open(this.path, 'r')
        .then(async (fh) => {
          this.position = (await fh.stat()).size;
          await fh.close();
        })
        .catch(() => undefined);
    }
    this.timer = setInterval(() => void this.poll(), this.intervalMs);
    this.timer.unref();
  }

  /** Reads what is left and stops. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.poll();
    if (this.partial) this.emit(this.partial);
    this.partial = '';
  }

  private async poll(): Promise<void> {
    if (this.reading) return;
    this.reading = true;
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
      this.reading = false;
    }
  }

  private emit(line: string): void {
    if (this.stream === 'stderr') this.logger.warn({ stream: 'vmm-stderr' }, line);
    else this.logger.info({ stream: 'vmm-stdout' }, line);
  }
}
