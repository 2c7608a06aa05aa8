/**
 * A Firecracker API error: the HTTP status and the `fault_message` Firecracker would send.
 * Messages follow Firecracker's own wording (src/vmm/src/rpc_interface.rs, persist.rs,
 * api_server/parsed_request.rs) so a client written against the double reads the same text
 * it would read from Firecracker.
 */
export class ApiFault extends Error {
  readonly code = 'VMM_API_FAULT';
  constructor(
    readonly status: number,
    readonly faultMessage: string,
    /** Firecracker treats a failed snapshot restore as fatal: it answers, then exits. */
    readonly fatal = false,
  ) {
    super(faultMessage);
    this.name = 'ApiFault';
  }
}

export const PRE_BOOT_UNSUPPORTED = 'The requested operation is not supported before starting the microVM.';
export const POST_BOOT_UNSUPPORTED = 'The requested operation is not supported after starting the microVM.';
export const LOAD_NOT_ALLOWED =
  'Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.';
export const SNAPSHOT_WHILE_RUNNING =
  'Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running';
export const MISSING_KERNEL = 'Start microvm error: Cannot start microvm without kernel configuration.';

export function badRequest(message: string, fatal = false): ApiFault {
  return new ApiFault(400, message, fatal);
}

/** serde_json's wording, as Firecracker wraps it. */
export function deserializeError(detail: string): ApiFault {
  return badRequest(`An error occurred when deserializing the json body of a request: ${detail}.`);
}

/** A failure inside the VMM (memory, disk, network) while carrying out an accepted request. */
export class VmmFailure extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly facts: Record<string, unknown> = {},
  ) {
    super(message);
    this.name = 'VmmFailure';
  }
}

/** The text Rust prints for an io::Error: "No such file or directory (os error 2)". */
export function osErrorText(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  const errno = typeof e.errno === 'number' ? Math.abs(e.errno) : undefined;
  const text = OS_ERROR_TEXT[e.code ?? ''];
  if (text && errno !== undefined) return `${text} (os error ${errno})`;
  return e.message ?? String(err);
}

const OS_ERROR_TEXT: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  ECONNREFUSED: 'Connection refused',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EEXIST: 'File exists',
  EINVAL: 'Invalid argument',
  ENOTSOCK: 'Socket operation on non-socket',
};
