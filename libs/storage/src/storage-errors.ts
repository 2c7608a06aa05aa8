/**
 * Typed errors of the storage library. Each has a stable `code` and the facts that explain
 * it; only a service's gRPC edge maps them to status codes.
 */

/** Where in a header or mapping list the problem is. */
export interface HeaderProblemLocation {
  mappingIndex?: number;
  offset?: number;
}

/** A header (or a mapping set) breaks DESIGN.md §2 and must not be trusted. */
export class HeaderInvalid extends Error {
  readonly code = 'HEADER_INVALID';
  readonly mappingIndex: number | undefined;
  readonly offset: number | undefined;
  constructor(
    readonly problem: string,
    location: HeaderProblemLocation = {},
  ) {
    const where: string[] = [];
    if (location.mappingIndex !== undefined) where.push(`mapping ${location.mappingIndex}`);
    if (location.offset !== undefined) where.push(`offset ${location.offset}`);
    super(`header invalid: ${problem}${where.length > 0 ? ` (${where.join(', ')})` : ''}`);
    this.name = 'HeaderInvalid';
    this.mappingIndex = location.mappingIndex;
    this.offset = location.offset;
  }
}

/** A build id string is not a UUID. */
export class BuildIdInvalid extends Error {
  readonly code = 'BUILD_ID_INVALID';
  constructor(readonly value: string) {
    super(`build id is not a UUID: ${JSON.stringify(value.slice(0, 64))}`);
    this.name = 'BuildIdInvalid';
  }
}

/** An object is absent from the bucket or local directory. */
export class ObjectNotFound extends Error {
  readonly code: string = 'OBJECT_NOT_FOUND';
  constructor(
    readonly objectPath: string,
    readonly location: string,
  ) {
    super(`object not found: ${objectPath} in ${location}`);
    this.name = 'ObjectNotFound';
  }
}

/** A build's data or header is absent: the build was never written, or was deleted. */
export class BuildNotFound extends ObjectNotFound {
  override readonly code = 'BUILD_NOT_FOUND';
  constructor(
    readonly buildId: string,
    objectPath: string,
    location: string,
  ) {
    super(objectPath, location);
    this.message = `build not found: ${buildId} (${objectPath} in ${location})`;
    this.name = 'BuildNotFound';
  }
}

/** The storage backend failed in a way that may pass (timeout, 5xx, reset): retryable. */
export class StorageUnavailable extends Error {
  readonly code = 'STORAGE_UNAVAILABLE';
  readonly retryable = true;
  constructor(
    readonly operation: string,
    readonly objectPath: string,
    override readonly cause: unknown,
  ) {
    super(`storage unavailable: ${operation} ${objectPath}: ${cause instanceof Error ? cause.message : String(cause)}`);
    this.name = 'StorageUnavailable';
  }
}

/** A build upload failed after all retries; the local copy stays registered. */
export class UploadFailed extends Error {
  readonly code = 'UPLOAD_FAILED';
  constructor(
    readonly buildId: string,
    readonly objectPath: string,
    readonly attempts: number,
    override readonly cause: unknown,
  ) {
    super(
      `upload of ${objectPath} for build ${buildId} failed after ${attempts} attempts: ${
        cause instanceof Error ? cause.message : String(cause)
      }`,
    );
    this.name = 'UploadFailed';
  }
}

/** A read or ensure on a cache or file that was closed. */
export class StorageClosed extends Error {
  readonly code = 'STORAGE_CLOSED';
  constructor(readonly what: string) {
    super(`${what} is closed`);
    this.name = 'StorageClosed';
  }
}

/** A recorded prefetch set (`memfile.prefetch`) that must not be used; a resume goes on without it. */
export class PrefetchInvalid extends Error {
  readonly code = 'PREFETCH_INVALID';
  constructor(
    readonly problem: string,
    readonly entryIndex?: number,
  ) {
    super(`prefetch set invalid: ${problem}`);
    this.name = 'PrefetchInvalid';
  }
}
