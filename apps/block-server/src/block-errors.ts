import { TypedError } from '#service-kit';
/**
 * Typed errors of block-server. Each has a stable `code` and the facts; only the gRPC edge
 * maps them to status codes (the service kit's one table). Bad request fields are the kit's
 * RequestInvalid.
 */

export class DeviceNotFound extends TypedError {
  readonly code = 'DEVICE_NOT_FOUND';
  constructor(readonly sandboxId: string) {
    super(`no block device for sandbox ${sandboxId}`);
  }
}

export class DeviceExists extends TypedError {
  readonly code = 'DEVICE_EXISTS';
  constructor(readonly sandboxId: string) {
    super(`a block device for sandbox ${sandboxId} is already open`);
  }
}

/** Export waited for the device's clients to go away and they did not. */
export class DeviceBusy extends TypedError {
  readonly code = 'DEVICE_BUSY';
  constructor(
    readonly sandboxId: string,
    readonly connections: number,
    readonly waitedMs: number,
  ) {
    super(`device of sandbox ${sandboxId} still has ${connections} client(s) after ${waitedMs} ms`);
  }
}

/** The device is being exported or closed; no new I/O or connections. */
export class DeviceClosing extends TypedError {
  readonly code = 'DEVICE_CLOSING';
  constructor(readonly sandboxId: string) {
    super(`device of sandbox ${sandboxId} is closing`);
  }
}

/** A persisted overlay state file cannot be used (wrong size, torn, another device's). */
export class OverlayStateInvalid extends TypedError {
  readonly code = 'OVERLAY_STATE_INVALID';
  constructor(
    readonly path: string,
    readonly problem: string,
  ) {
    super(`overlay state ${path} invalid: ${problem}`);
  }
}
