import { status, type ServiceError } from '@grpc/grpc-js';
import { ConfigInvalid } from '#config';
import {
  BuildExists,
  BuildUnavailable,
  CapacityExhausted,
  EnvdInitTimeout,
  OrchestratorStopping,
  RequestInvalid,
  SandboxBusy,
  SandboxExists,
  SandboxNotFound,
  SandboxStepFailed,
  TemplateExists,
  TemplateNotFound,
} from './orchestrator-errors.js';

/** The one place typed errors become gRPC status codes. */
export function statusOf(error: unknown): status {
  if (error instanceof RequestInvalid || error instanceof ConfigInvalid) return status.INVALID_ARGUMENT;
  if (error instanceof SandboxNotFound || error instanceof TemplateNotFound || error instanceof BuildUnavailable) {
    return status.NOT_FOUND;
  }
  if (error instanceof SandboxExists || error instanceof BuildExists || error instanceof TemplateExists) {
    return status.ALREADY_EXISTS;
  }
  if (error instanceof SandboxBusy) return status.FAILED_PRECONDITION;
  if (error instanceof CapacityExhausted) return status.RESOURCE_EXHAUSTED;
  if (error instanceof OrchestratorStopping) return status.UNAVAILABLE;
  if (error instanceof EnvdInitTimeout) return status.DEADLINE_EXCEEDED;
  if (error instanceof SandboxStepFailed) {
    const cause = error.cause;
    if (isServiceError(cause) && (cause.code === status.RESOURCE_EXHAUSTED || cause.code === status.UNAVAILABLE)) {
      return cause.code;
    }
    if (isServiceError(cause) && cause.code === status.NOT_FOUND) return status.NOT_FOUND;
    if (cause instanceof EnvdInitTimeout) return status.DEADLINE_EXCEEDED;
    if (cause instanceof BuildUnavailable || cause instanceof TemplateNotFound) return status.NOT_FOUND;
    return status.INTERNAL;
  }
  if (isServiceError(error)) return error.code;
  return status.INTERNAL;
}

export function toServiceError(error: unknown): Partial<ServiceError> {
  const message = error instanceof Error ? error.message : String(error);
  return { code: statusOf(error), details: message, message };
}

function isServiceError(value: unknown): value is ServiceError {
  return value instanceof Error && typeof (value as Partial<ServiceError>).code === 'number' && 'metadata' in value;
}
