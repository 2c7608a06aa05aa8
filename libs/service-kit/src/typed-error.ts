import type { ErrorCode } from './error-status.js';

/**
 * The base of every error a service raises on purpose: a stable `code` (a key of the one
 * code → gRPC status table, error-status.ts) and the facts that explain it as readonly fields.
 * Errors are typed where they happen; only the gRPC edge (unary-handler.ts) turns them into
 * status codes.
 */
export abstract class TypedError extends Error {
  abstract readonly code: ErrorCode;

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A request field that breaks its rule (unsafe id, relative path, value out of bounds). */
export class RequestInvalid extends TypedError {
  readonly code = 'REQUEST_INVALID';
  constructor(
    readonly field: string,
    readonly reason: string,
  ) {
    super(`invalid ${field}: ${reason}`);
  }
}
