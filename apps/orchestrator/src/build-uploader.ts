import type { Logger } from '#logging';

export interface UploadStatus {
  buildId: string;
  state: 'queued' | 'uploading' | 'done' | 'failed';
  attempts: number;
  lastError?: string;
}

/**
 * Uploads new builds to the bucket in the background with retries and exponential backoff.
 * A failed upload stays reported (status, log line, callback) and is retried again on
 * `retryFailed`; it is never silently dropped.
 */
export class BuildUploader {
  private readonly status = new Map<string, UploadStatus>();
  private readonly inflight = new Map<string, Promise<void>>();
  private stopped = false;

  constructor(
    private readonly upload: (buildId: string) => Promise<void>,
    private readonly options: {
      retries: number;
      backoffMs: number;
      logger: Logger;
      onFailed?: (s: UploadStatus) => void;
    },
  ) {}

  enqueue(buildId: string): Promise<void> {
    const existing = this.inflight.get(buildId);
    if (existing) return existing;
    const status: UploadStatus = { buildId, state: 'queued', attempts: 0 };
    this.status.set(buildId, status);
    const job = this.attempt(status).finally(() => this.inflight.delete(buildId));
    this.inflight.set(buildId, job);
    return job;
  }

  /** Resolves once an upload of this build in flight has ended (at once when none is). */
  async settled(buildId: string): Promise<void> {
    await this.inflight.get(buildId)?.catch(() => undefined);
  }

  get(buildId: string): UploadStatus | undefined {
    return this.status.get(buildId);
  }

  list(): UploadStatus[] {
    return [...this.status.values()];
  }

  retryFailed(): void {
    for (const s of this.status.values()) if (s.state === 'failed') void this.enqueue(s.buildId);
  }

  /** Waits for every upload in flight (shutdown, tests). */
  async drain(): Promise<void> {
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight.values()]);
  }

  stop(): void {
    this.stopped = true;
  }

  private async attempt(status: UploadStatus): Promise<void> {
    const { retries, backoffMs, logger } = this.options;
    for (let attempt = 0; attempt <= retries && !this.stopped; attempt++) {
      status.state = 'uploading';
      status.attempts++;
      try {
        await this.upload(status.buildId);
        status.state = 'done';
        delete status.lastError;
        logger.info({ buildId: status.buildId, attempts: status.attempts }, 'build uploaded');
        return;
      } catch (err) {
        status.lastError = (err as Error).message;
        logger.warn(
          { buildId: status.buildId, attempt: status.attempts, err: status.lastError },
          'build upload failed',
        );
        if (attempt < retries) await new Promise((r) => setTimeout(r, backoffMs * 2 ** attempt));
      }
    }
    status.state = 'failed';
    logger.error({ buildId: status.buildId, attempts: status.attempts, err: status.lastError }, 'build upload gave up');
    this.options.onFailed?.(status);
  }
}
