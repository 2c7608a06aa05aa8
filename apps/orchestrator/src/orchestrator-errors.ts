import { TypedError } from '#service-kit';
/**
 * Typed errors of the orchestrator. Each has a stable `code` and the facts that explain it;
 * only the gRPC edge maps them to status codes (the service kit's one table).
 */

/** A request field that breaks its rule: the kit's one RequestInvalid. */
export { RequestInvalid } from '#service-kit';

/** A request field this node does not serve (E2B's volume mounts): refused, never ignored. */
export class FieldNotServed extends TypedError {
  readonly code = 'FIELD_NOT_SERVED';
  constructor(
    readonly field: string,
    readonly reason: string,
  ) {
    super(`${field} is not served by this node: ${reason}`);
  }
}

/** A create or resume asking for other vCPUs or memory than the snapshot was taken with. */
export class ResourcesMismatch extends TypedError {
  readonly code = 'RESOURCES_MISMATCH';
  constructor(
    readonly field: string,
    readonly requested: number,
    readonly build: number,
    readonly buildId: string,
  ) {
    super(
      `invalid ${field}: ${requested} requested, but build '${buildId}' was snapshotted with ${build} ` +
        "(a snapshot fixes vCPUs and memory; 0 takes the build's)",
    );
  }
}

export class SandboxNotFound extends TypedError {
  readonly code = 'SANDBOX_NOT_FOUND';
  constructor(readonly sandboxId: string) {
    super(`sandbox '${sandboxId}' not found`);
  }
}

export class SandboxExists extends TypedError {
  readonly code = 'SANDBOX_EXISTS';
  constructor(readonly sandboxId: string) {
    super(`sandbox '${sandboxId}' already exists on this node`);
  }
}

/** The sandbox exists but is in a state the operation cannot run in (e.g. pausing twice). */
export class SandboxBusy extends TypedError {
  readonly code = 'SANDBOX_BUSY';
  constructor(
    readonly sandboxId: string,
    readonly state: string,
    readonly operation: string,
  ) {
    super(`sandbox '${sandboxId}' is ${state}; cannot ${operation}`);
  }
}

export class TemplateNotFound extends TypedError {
  readonly code = 'TEMPLATE_NOT_FOUND';
  constructor(readonly templateId: string) {
    super(`template '${templateId}' not found`);
  }
}

/** `template create` for an id that exists (without replace) or is being built right now. */
export class TemplateExists extends TypedError {
  readonly code = 'TEMPLATE_EXISTS';
  constructor(
    readonly templateId: string,
    readonly detail: string,
  ) {
    super(`template '${templateId}' ${detail}`);
  }
}

/** A build id that is neither in the local cache nor in the bucket, or lacks a file it needs. */
export class BuildUnavailable extends TypedError {
  readonly code = 'BUILD_UNAVAILABLE';
  constructor(
    readonly buildId: string,
    readonly reason: string,
  ) {
    super(`build '${buildId}' not found: ${reason}`);
  }
}

export class BuildExists extends TypedError {
  readonly code = 'BUILD_EXISTS';
  constructor(readonly buildId: string) {
    super(`build '${buildId}' already exists`);
  }
}

/** One step of a sandbox flow failed; everything taken before it has been given back. */
export class SandboxStepFailed extends TypedError {
  readonly code = 'SANDBOX_STEP_FAILED';
  constructor(
    readonly sandboxId: string,
    readonly flow: 'create' | 'pause' | 'checkpoint' | 'delete' | 'adopt',
    readonly step: string,
    override readonly cause: unknown,
    readonly rollbackErrors: string[] = [],
  ) {
    const why = cause instanceof Error ? cause.message : String(cause);
    const rollback = rollbackErrors.length ? ` (rollback problems: ${rollbackErrors.join('; ')})` : '';
    super(`${flow} sandbox '${sandboxId}': step '${step}' failed: ${why}${rollback}`);
  }
}

/**
 * The node is at a limit: sandboxes running, sandboxes starting at once (a resume waited its
 * bound for a turn, a fresh create does not wait), or the pause queue.
 */
export class CapacityExhausted extends TypedError {
  readonly code = 'CAPACITY_EXHAUSTED';
  constructor(
    readonly what: string,
    readonly limit: number,
  ) {
    super(`${what} at its limit (${limit})`);
  }
}

/** A Firecracker API call answered with an error status. */
export class VmmApiError extends TypedError {
  readonly code = 'VMM_API_ERROR';
  constructor(
    readonly method: string,
    readonly path: string,
    readonly status: number,
    readonly faultMessage: string,
  ) {
    super(`${method} ${path} → ${status}: ${faultMessage}`);
  }
}

/** The VMM process exited (or never opened its API socket). */
export class VmmExited extends TypedError {
  readonly code = 'VMM_EXITED';
  constructor(
    readonly sandboxId: string,
    readonly detail: string,
  ) {
    super(`vmm of sandbox '${sandboxId}' ${detail}`);
  }
}

/** envd did not answer /init with 204 within the envd timeout. */
export class EnvdInitTimeout extends TypedError {
  readonly code = 'ENVD_INIT_TIMEOUT';
  constructor(
    readonly address: string,
    readonly timeoutMs: number,
    readonly lastError: string,
  ) {
    super(`envd at ${address} not ready after ${timeoutMs} ms: ${lastError}`);
  }
}

export class OrchestratorStopping extends TypedError {
  readonly code = 'ORCHESTRATOR_STOPPING';
  constructor() {
    super('orchestrator is shutting down');
  }
}
