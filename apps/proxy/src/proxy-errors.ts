/**
 * Why a request was not forwarded. Each error names the sandbox and port it was for; only
 * error-response.ts turns them into HTTP statuses and bodies.
 */
export abstract class ProxyError extends Error {
  abstract readonly code: string;
  constructor(
    message: string,
    readonly sandboxId: string | undefined,
    readonly port: number | undefined,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** The Host (or the e2b-sandbox-id / e2b-sandbox-port pair) does not name a sandbox port. */
export class RouteRequestInvalid extends ProxyError {
  readonly code = 'BAD_ROUTE';
  constructor(readonly reason: string) {
    super(reason, undefined, undefined);
  }
}

/** The sandbox requires a traffic access token and the request's is missing or wrong. */
export class AccessDenied extends ProxyError {
  readonly code = 'ACCESS_DENIED';
  constructor(sandboxId: string, port: number, missing: boolean) {
    super(
      missing
        ? `sandbox ${sandboxId} requires header e2b-traffic-access-token`
        : `wrong e2b-traffic-access-token for sandbox ${sandboxId}`,
      sandboxId,
      port,
    );
  }
}

export class SandboxUnknown extends ProxyError {
  readonly code = 'SANDBOX_NOT_FOUND';
  constructor(sandboxId: string, port: number) {
    super(`sandbox ${sandboxId} is not on this node`, sandboxId, port);
  }
}

/** Known here but not serving: paused without auto-resume, pausing, starting too long. */
export class SandboxNotRunning extends ProxyError {
  readonly code = 'SANDBOX_NOT_RUNNING';
  constructor(
    sandboxId: string,
    port: number,
    readonly detail: string,
  ) {
    super(`sandbox ${sandboxId} is not running: ${detail}`, sandboxId, port);
  }
}

/** Resume on request failed (or the orchestrator could not be asked). */
export class ResumeFailed extends ProxyError {
  readonly code = 'RESUME_FAILED';
  constructor(
    sandboxId: string,
    port: number,
    readonly detail: string,
  ) {
    super(`sandbox ${sandboxId} could not be resumed: ${detail}`, sandboxId, port);
  }
}

/** Nothing listens on that port in the sandbox (connection refused or reset at connect). */
export class PortClosed extends ProxyError {
  readonly code = 'PORT_CLOSED';
  constructor(sandboxId: string, port: number, errno: string) {
    super(`sandbox ${sandboxId} is running but nothing listens on port ${port} (${errno})`, sandboxId, port);
  }
}

/** The sandbox did not answer in time: connect timeout, or a resume that took too long. */
export class UpstreamTimeout extends ProxyError {
  readonly code = 'UPSTREAM_TIMEOUT';
  constructor(sandboxId: string, port: number, what: string) {
    super(`sandbox ${sandboxId} port ${port}: ${what}`, sandboxId, port);
  }
}

/** The connection to the sandbox broke before an answer came. */
export class UpstreamFailed extends ProxyError {
  readonly code = 'UPSTREAM_FAILED';
  constructor(sandboxId: string, port: number, detail: string) {
    super(`sandbox ${sandboxId} port ${port}: ${detail}`, sandboxId, port);
  }
}
