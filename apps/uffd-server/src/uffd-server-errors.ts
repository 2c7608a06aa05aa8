import { TypedError } from '#service-kit';

/** Errors of uffd-server, each with a stable `code` and the facts; only the gRPC edge maps them. */
export { RequestInvalid } from '#service-kit';

export class SandboxNotFound extends TypedError {
  readonly code = 'SANDBOX_NOT_FOUND';
  constructor(readonly sandboxId: string) {
    super(`no memory serving for sandbox ${sandboxId}`);
  }
}

export class SandboxExists extends TypedError {
  readonly code = 'SANDBOX_EXISTS';
  constructor(readonly sandboxId: string) {
    super(`sandbox ${sandboxId} is already being served`);
  }
}

/** The request does not fit the sandbox's state (export before stop-sourcing, etc.). */
export class InvalidState extends TypedError {
  readonly code = 'INVALID_STATE';
  constructor(
    readonly sandboxId: string,
    readonly state: string,
    what: string,
  ) {
    super(`sandbox ${sandboxId} is ${state}: ${what}`);
  }
}

/** The memory source does not match what the sandbox needs (short data file, bad page size). */
export class SourceInvalid extends TypedError {
  readonly code = 'SOURCE_INVALID';
  constructor(
    readonly what: string,
    reason: string,
  ) {
    super(`${what}: ${reason}`);
  }
}

/** Serving a sandbox failed: the fault, handshake or fetch problem that ended it. */
export class ServingFailed extends TypedError {
  readonly code = 'SERVING_FAILED';
  constructor(
    readonly sandboxId: string,
    readonly reason: string,
    readonly detail: Record<string, unknown> = {},
  ) {
    super(`sandbox ${sandboxId}: ${reason}`);
  }
}

/** No handshake arrived on the sandbox's socket in time. */
export class HandshakeTimeout extends TypedError {
  readonly code = 'HANDSHAKE_TIMEOUT';
  constructor(
    readonly socketPath: string,
    readonly timeoutMs: number,
  ) {
    super(`no UFFD handshake on ${socketPath} within ${timeoutMs} ms`);
  }
}
