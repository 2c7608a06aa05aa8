/**
 * Where builds live: a Google Cloud Storage bucket or a local directory (DESIGN.md §2). Object
 * paths are relative (`{buildId}/memfile`). Missing objects reject with ObjectNotFound,
 * transient failures (timeouts, 5xx, resets) with StorageUnavailable, which callers may retry.
 */
export interface StorageBackend {
  /** `gs://bucket` or the local directory, for messages. */
  readonly location: string;
  /** Exactly `length` bytes at `offset`; RangeError when the range passes the object's end. */
  readRange(objectPath: string, offset: number, length: number): Promise<Buffer>;
  /** The whole object (headers, small files). */
  read(objectPath: string): Promise<Buffer>;
  size(objectPath: string): Promise<number>;
  exists(objectPath: string): Promise<boolean>;
  /** Writes a small object whole (headers). Readers never see it half-written. */
  write(objectPath: string, data: Uint8Array): Promise<void>;
  /** Uploads a local file; readers never see it half-written. */
  upload(objectPath: string, localFile: string, options?: UploadOptions): Promise<void>;
  /** Downloads to `localFile` (written under a temporary name, then renamed). */
  download(objectPath: string, localFile: string): Promise<void>;
  /** Object paths starting with `prefix`, sorted. */
  list(prefix: string): Promise<string[]>;
  /** Removes an object; removing an absent one is not an error. */
  delete(objectPath: string): Promise<void>;
  close(): Promise<void>;
}

export interface UploadOptions {
  /** Bytes sent so far. */
  onProgress?: (bytesSent: number) => void;
}
