import { status, type ServiceError } from '@grpc/grpc-js';

/** Marks a wrapping error (a flow step that failed) whose status comes from its cause. */
const FROM_CAUSE = 'from-cause';

/**
 * The one table from error `code` to gRPC status, for every service. A TypedError's code must
 * be a key here (the compiler checks it); errors of libraries that keep their own classes
 * (storage, native syscalls, Node's errno errors) are matched by the same `code` string.
 * A code that is not here becomes INTERNAL.
 */
export const STATUS_BY_CODE = {
  // requests and configuration
  REQUEST_INVALID: status.INVALID_ARGUMENT,
  CONFIG_INVALID: status.INVALID_ARGUMENT,
  TEARDOWN_FAILED: status.INTERNAL,
  // orchestrator
  SANDBOX_NOT_FOUND: status.NOT_FOUND,
  SANDBOX_EXISTS: status.ALREADY_EXISTS,
  SANDBOX_BUSY: status.FAILED_PRECONDITION,
  SANDBOX_STEP_FAILED: FROM_CAUSE,
  TEMPLATE_NOT_FOUND: status.NOT_FOUND,
  TEMPLATE_EXISTS: status.ALREADY_EXISTS,
  // Not (yet) in storage: E2B's control plane retries a FAILED_PRECONDITION later.
  BUILD_UNAVAILABLE: status.FAILED_PRECONDITION,
  FIELD_NOT_SERVED: status.UNIMPLEMENTED,
  RESOURCES_MISMATCH: status.INVALID_ARGUMENT,
  BUILD_EXISTS: status.ALREADY_EXISTS,
  CAPACITY_EXHAUSTED: status.RESOURCE_EXHAUSTED,
  VMM_API_ERROR: status.INTERNAL,
  VMM_EXITED: status.INTERNAL,
  ENVD_INIT_TIMEOUT: status.DEADLINE_EXCEEDED,
  ORCHESTRATOR_STOPPING: status.UNAVAILABLE,
  // block-server
  DEVICE_NOT_FOUND: status.NOT_FOUND,
  DEVICE_EXISTS: status.ALREADY_EXISTS,
  DEVICE_BUSY: status.FAILED_PRECONDITION,
  DEVICE_CLOSING: status.FAILED_PRECONDITION,
  OVERLAY_STATE_INVALID: status.DATA_LOSS,
  NBD_SOCKET_IN_USE: status.FAILED_PRECONDITION,
  NO_FREE_NBD_DEVICE: status.RESOURCE_EXHAUSTED,
  NBD_DEVICE_IN_USE: status.FAILED_PRECONDITION,
  // uffd-server
  INVALID_STATE: status.FAILED_PRECONDITION,
  SOURCE_INVALID: status.INVALID_ARGUMENT,
  SERVING_FAILED: status.INTERNAL,
  HANDSHAKE_TIMEOUT: status.DEADLINE_EXCEEDED,
  UFFD_HANDSHAKE_INVALID: status.INVALID_ARGUMENT,
  // net-agent
  SLOT_INDEX_INVALID: status.INVALID_ARGUMENT,
  IPV4_INVALID: status.INVALID_ARGUMENT,
  SLOT_POOL_EXHAUSTED: status.RESOURCE_EXHAUSTED,
  SLOTS_EXHAUSTED: status.RESOURCE_EXHAUSTED,
  SLOT_NOT_IN_USE: status.NOT_FOUND,
  SLOT_NOT_OWNED: status.FAILED_PRECONDITION,
  SLOT_ALREADY_RELEASED: status.FAILED_PRECONDITION,
  SLOT_REALLOCATED: status.FAILED_PRECONDITION,
  POOL_STOPPED: status.UNAVAILABLE,
  RESERVATION_UNAVAILABLE: status.UNAVAILABLE,
  UPLINK_NOT_FOUND: status.FAILED_PRECONDITION,
  SLOT_CREATE_FAILED: status.INTERNAL,
  SLOT_REMOVE_FAILED: status.INTERNAL,
  NAMESPACE_LINKS_FAILED: status.INTERNAL,
  NAMESPACE_SETUP_FAILED: status.INTERNAL,
  NETLINK_MESSAGE_INVALID: status.INTERNAL,
  COMMAND_FAILED: status.INTERNAL,
  // dns
  DNS_RECORD_INVALID: status.INVALID_ARGUMENT,
  DNS_MESSAGE_INVALID: status.INVALID_ARGUMENT,
  DNS_BATCH_UDP_UNAVAILABLE: status.UNAVAILABLE,
  // libraries with their own classes (libs/storage, libs/grpc, native) and Node errno codes
  HEADER_INVALID: status.FAILED_PRECONDITION,
  BUILD_ID_INVALID: status.INVALID_ARGUMENT,
  OBJECT_NOT_FOUND: status.NOT_FOUND,
  BUILD_NOT_FOUND: status.NOT_FOUND,
  STORAGE_UNAVAILABLE: status.UNAVAILABLE,
  STORAGE_CLOSED: status.UNAVAILABLE,
  UPLOAD_FAILED: status.UNAVAILABLE,
  SOCKET_IN_USE: status.FAILED_PRECONDITION,
  ENOENT: status.NOT_FOUND,
  ENOSPC: status.RESOURCE_EXHAUSTED,
} as const satisfies Record<string, status | typeof FROM_CAUSE>;

export type ErrorCode = keyof typeof STATUS_BY_CODE;

/**
 * A wrapped cause keeps its status only when it tells the caller something it can act on
 * (retry later, look elsewhere, wait); anything else a step met is the node's own failure.
 */
const CAUSE_STATUSES: ReadonlySet<status> = new Set([
  status.NOT_FOUND,
  status.RESOURCE_EXHAUSTED,
  status.UNAVAILABLE,
  status.DEADLINE_EXCEEDED,
]);

/** The gRPC status of any thrown value. A peer's ServiceError keeps its own code. */
export function statusOf(error: unknown): status {
  if (isServiceError(error)) return error.code;
  const code = (error as { code?: unknown } | undefined)?.code;
  const mapped =
    typeof code === 'string' ? (STATUS_BY_CODE as Record<string, status | typeof FROM_CAUSE>)[code] : undefined;
  if (mapped !== FROM_CAUSE) return mapped ?? status.INTERNAL;
  const cause = statusOf((error as Error).cause);
  return CAUSE_STATUSES.has(cause) ? cause : status.INTERNAL;
}

/** The error a gRPC callback takes: the status, and a message that names the step. */
export function toServiceError(step: string, error: unknown): Partial<ServiceError> {
  const message = `${step}: ${error instanceof Error ? error.message : String(error)}`;
  return { code: statusOf(error), details: message, message };
}

/** A gRPC error as grpc-js raises it (a peer's answer), not one of ours with a string code. */
export function isServiceError(value: unknown): value is ServiceError {
  return value instanceof Error && typeof (value as Partial<ServiceError>).code === 'number' && 'metadata' in value;
}
