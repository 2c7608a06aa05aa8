/**
 * Typed errors of block-server. Each has a stable `code` and the facts; only the gRPC edge
 * (control-service.ts) maps them to status codes.
 */

export class DeviceNotFound extends Error {
  readonly code = 'DEVICE_NOT_FOUND';
  constructor(readonly sandboxId: string) {
    super(`no block device for sandbox ${sandboxId}`);
    this.name = 'DeviceNotFound';
  }
}

export class DeviceExists extends Error {
  readonly code = 'DEVICE_EXISTS';
  constructor(readonly sandboxId: string) {
    super(`a block device for sandbox ${sandboxId} is already open`);
    this.name = 'DeviceExists';
  }
}

/** Export waited for the device's clients to go away and they did not. */
export class DeviceBusy extends Error {
  readonly code = 'DEVICE_BUSY';
  constructor(
    readonly sandboxId: string,
    readonly connections: number,
    readonly waitedMs: number,
  ) {
    super(`device of sandbox ${sandboxId} still has ${connections} client(s) after ${waitedMs} ms`);
    this.name = 'DeviceBusy';
  }
}

/** The device is being exported or closed; no new I/O or connections. */
export class DeviceClosing extends Error {
  readonly code = 'DEVICE_CLOSING';
  constructor(readonly sandboxId: string) {
    super(`device of sandbox ${sandboxId} is closing`);
    this.name = 'DeviceClosing';
  }
}

/** A persisted overlay state file cannot be used (wrong size, torn, another device's). */
export class OverlayStateInvalid extends Error {
  readonly code = 'OVERLAY_STATE_INVALID';
  constructor(
    readonly path: string,
    readonly problem: string,
  ) {
    super(`overlay state ${path} invalid: ${problem}`);
    this.name = 'OverlayStateInvalid';
  }
}

/** A request's arguments are unusable (ids, paths). */
export class BlockRequestInvalid extends Error {
  readonly code = 'BLOCK_REQUEST_INVALID';
  constructor(
    readonly field: string,
    readonly problem: string,
  ) {
    super(`${field}: ${problem}`);
    this.name = 'BlockRequestInvalid';
  }
}
