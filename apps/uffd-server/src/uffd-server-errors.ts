/** Errors of uffd-server, each with a stable `code` and the facts; only the gRPC edge maps them. */
export class SandboxNotFound extends Error {
  readonly code = 'SANDBOX_NOT_FOUND';
  constructor(readonly sandboxId: string) {
    super(`no memory serving for sandbox ${sandboxId}`);
    this.name = 'SandboxNotFound';
  }
}

export class SandboxExists extends Error {
  readonly code = 'SANDBOX_EXISTS';
  constructor(readonly sandboxId: string) {
    super(`sandbox ${sandboxId} is already being served`);
    this.name = 'SandboxExists';
  }
}

/** The request does not fit the sandbox's state (export before stop-sourcing, etc.). */
export class InvalidState extends Error {
  readonly code = 'INVALID_STATE';
  constructor(
    readonly sandboxId: string,
    readonly state: string,
    what: string,
  ) {
    super(`sandbox ${sandboxId} is ${state}: ${what}`);
    this.name = 'InvalidState';
  }
}

/** A request field is unusable (bad id, relative path, unsupported page size). */
export class RequestInvalid extends Error {
  readonly code = 'REQUEST_INVALID';
  constructor(
    readonly field: string,
    reason: string,
  ) {
    super(`${field}: ${reason}`);
    this.name = 'RequestInvalid';
  }
}

/** The memory source does not match what the sandbox needs (short data file, bad page size). */
export class SourceInvalid extends Error {
  readonly code = 'SOURCE_INVALID';
  constructor(
    readonly what: string,
    reason: string,
  ) {
    super(`${what}: ${reason}`);
    this.name = 'SourceInvalid';
  }
}

/** Serving a sandbox failed: the fault, handshake or fetch problem that ended it. */
export class ServingFailed extends Error {
  readonly code = 'SERVING_FAILED';
  constructor(
    readonly sandboxId: string,
    readonly reason: string,
    readonly detail: Record<string, unknown> = {},
  ) {
    super(`sandbox ${sandboxId}: ${reason}`);
    this.name = 'ServingFailed';
  }
}

/** No handshake arrived on the sandbox's socket in time. */
export class HandshakeTimeout extends Error {
  readonly code = 'HANDSHAKE_TIMEOUT';
  constructor(
    readonly socketPath: string,
    readonly timeoutMs: number,
  ) {
    super(`no UFFD handshake on ${socketPath} within ${timeoutMs} ms`);
    this.name = 'HandshakeTimeout';
  }
}
