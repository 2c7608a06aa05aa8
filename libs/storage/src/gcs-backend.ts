import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Bucket, File } from '@google-cloud/storage';
import { checkObjectPath } from './object-paths.js';
import type { StorageBackend, UploadOptions } from './storage-backend.js';
import { ObjectNotFound, StorageUnavailable } from './storage-errors.js';

export interface GcsBackendOptions {
  bucket: string;
  /** Another endpoint than Google's (the test double); requests to it are not authenticated. */
  apiEndpoint?: string;
  projectId?: string;
  /** A read that has not finished after this long fails as StorageUnavailable (retryable). Default 60 s. */
  readTimeoutMs?: number;
  /** Retries the client library does on its own for idempotent requests and upload chunks. */
  maxRetries?: number;
  /** Longest wait between the client library's own retries (at least 1 s). Default 8 s. */
  maxRetryDelayMs?: number;
  /** Resumable uploads send chunks of this size (a multiple of 256 KiB); default one stream. */
  uploadChunkSize?: number;
}

const TRANSIENT_HTTP = new Set([408, 429, 500, 502, 503, 504]);
const TRANSIENT_NET = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  'ENOTFOUND',
  'ECONNABORTED',
  'ERR_STREAM_PREMATURE_CLOSE',
]);

/**
 * Google Cloud Storage through @google-cloud/storage 7: ranged media reads, resumable uploads
 * (chunked when `uploadChunkSize` is set) retried by the client on transient failures.
 */
export class GcsBackend implements StorageBackend {
  readonly location: string;
  private readonly options: GcsBackendOptions;
  private bucketHandle: Promise<Bucket> | undefined;
  private readonly readTimeoutMs: number;
  private readonly uploadChunkSize: number | undefined;

  constructor(options: GcsBackendOptions) {
    this.location = `gs://${options.bucket}`;
    this.options = options;
    this.readTimeoutMs = options.readTimeoutMs ?? 60_000;
    this.uploadChunkSize = options.uploadChunkSize;
    // Loaded now, in the background, not at the first request: importing @google-cloud/storage
    // takes ~300 ms here, which a node's first cold resume paid twice (the orchestrator resolving
    // the build, the uffd-server preparing it; bench/cold-resume-node). A failure shows at first use.
    this.bucket().catch(() => undefined);
  }

  /** The client library is loaded by GcsBackends only: services on a local bucket never pay for it. */
  private bucket(): Promise<Bucket> {
    this.bucketHandle ??= import('@google-cloud/storage').then(({ Storage, IdempotencyStrategy }) => {
      const options = this.options;
      const storage = new Storage({
        ...(options.apiEndpoint !== undefined ? { apiEndpoint: options.apiEndpoint } : {}),
        ...(options.projectId !== undefined ? { projectId: options.projectId } : {}),
        retryOptions: {
          autoRetry: true,
          maxRetries: options.maxRetries ?? 3,
          retryDelayMultiplier: 2,
          // async-retry (session creation) refuses a maximum below its 1 s minimum.
          maxRetryDelay: Math.max(1000, options.maxRetryDelayMs ?? 8000) / 1000,
          totalTimeout: 120,
          // Our writes are whole objects under fresh build ids: repeating one is harmless.
          idempotencyStrategy: IdempotencyStrategy.RetryAlways,
        },
      });
      return storage.bucket(options.bucket);
    });
    return this.bucketHandle;
  }

  async readRange(objectPath: string, offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeError(`invalid range: offset ${offset}, length ${length}`);
    }
    if (length === 0) return Buffer.alloc(0);
    const data = await this.readStream(objectPath, { start: offset, end: offset + length - 1 }, 'read range');
    if (data.length !== length) {
      throw new RangeError(
        `range [${offset}, ${offset + length}) passes the end of ${objectPath} (got ${data.length} bytes)`,
      );
    }
    return data;
  }

  async read(objectPath: string): Promise<Buffer> {
    return this.readStream(objectPath, {}, 'read');
  }

  async size(objectPath: string): Promise<number> {
    try {
      const [metadata] = await (await this.file(objectPath)).getMetadata();
      return Number(metadata.size);
    } catch (err) {
      throw this.translate('size', objectPath, err);
    }
  }

  async exists(objectPath: string): Promise<boolean> {
    try {
      const [exists] = await (await this.file(objectPath)).exists();
      return exists;
    } catch (err) {
      throw this.translate('exists', objectPath, err);
    }
  }

  async write(objectPath: string, data: Uint8Array): Promise<void> {
    try {
      await (
        await this.file(objectPath)
      ).save(Buffer.from(data.buffer, data.byteOffset, data.byteLength), {
        resumable: true,
        contentType: 'application/octet-stream',
      });
    } catch (err) {
      throw this.translate('write', objectPath, err);
    }
  }

  async upload(objectPath: string, localFile: string, options: UploadOptions = {}): Promise<void> {
    await stat(localFile);
    try {
      await (
        await this.bucket()
      ).upload(localFile, {
        destination: checkObjectPath(objectPath),
        resumable: true,
        contentType: 'application/octet-stream',
        ...(this.uploadChunkSize !== undefined ? { chunkSize: this.uploadChunkSize } : {}),
        ...(options.onProgress !== undefined
          ? { onUploadProgress: (e: { bytesWritten?: number }) => options.onProgress!(Number(e.bytesWritten ?? 0)) }
          : {}),
      });
    } catch (err) {
      throw this.translate('upload', objectPath, err);
    }
  }

  async download(objectPath: string, localFile: string): Promise<void> {
    await mkdir(path.dirname(localFile), { recursive: true });
    const tmp = `${localFile}.sbx-tmp-${randomBytes(4).toString('hex')}`;
    try {
      await pipeline((await this.file(objectPath)).createReadStream(), createWriteStream(tmp, { flags: 'wx' }));
      await rename(tmp, localFile);
    } catch (err) {
      await rm(tmp, { force: true });
      throw this.translate('download', objectPath, err);
    }
  }

  async list(prefix: string): Promise<string[]> {
    try {
      const [files] = await (await this.bucket()).getFiles({ prefix, autoPaginate: true });
      return files.map((f) => f.name).sort();
    } catch (err) {
      throw this.translate('list', prefix, err);
    }
  }

  async delete(objectPath: string): Promise<void> {
    try {
      await (await this.file(objectPath)).delete({ ignoreNotFound: true });
    } catch (err) {
      throw this.translate('delete', objectPath, err);
    }
  }

  async close(): Promise<void> {}

  private async file(objectPath: string): Promise<File> {
    checkObjectPath(objectPath);
    return (await this.bucket()).file(objectPath);
  }

  private async readStream(
    objectPath: string,
    range: { start?: number; end?: number },
    operation: string,
  ): Promise<Buffer> {
    const file = await this.file(objectPath);
    return new Promise<Buffer>((resolve, reject) => {
      const stream = file.createReadStream({ ...range, validation: range.start === undefined });
      const chunks: Buffer[] = [];
      const timer = setTimeout(() => {
        stream.destroy(
          Object.assign(new Error(`no complete answer in ${this.readTimeoutMs} ms`), { code: 'ETIMEDOUT' }),
        );
      }, this.readTimeoutMs);
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('error', (err) => {
        clearTimeout(timer);
        reject(this.translate(operation, objectPath, err));
      });
      stream.on('end', () => {
        clearTimeout(timer);
        resolve(Buffer.concat(chunks));
      });
    });
  }

  private translate(operation: string, objectPath: string, err: unknown): Error {
    const e = err as { code?: unknown; status?: unknown; response?: { status?: unknown } };
    const status = typeof e.code === 'number' ? e.code : Number(e.response?.status ?? e.status ?? NaN);
    if (status === 404) return new ObjectNotFound(objectPath, this.location);
    if (status === 416) return new RangeError(`range outside ${objectPath}`);
    if (TRANSIENT_HTTP.has(status) || (typeof e.code === 'string' && TRANSIENT_NET.has(e.code))) {
      return new StorageUnavailable(operation, objectPath, err);
    }
    return err instanceof Error ? err : new Error(String(err));
  }
}
