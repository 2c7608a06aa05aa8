import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import { RouteState, type RoutingClient, type SandboxRoute } from '#proto/sbx/routing';
import { tokenMatches } from './access-token.js';
import { AccessDenied, ResumeFailed, SandboxNotRunning, SandboxUnknown, UpstreamTimeout } from './proxy-errors.js';
import type { RouteTable } from './route-table.js';
import type { RouteTarget } from './route-target.js';

export const AUTO_RESUME_ANY = 'any';

export interface RouteResolverOptions {
  table: RouteTable;
  routing: RoutingClient;
  resumeTimeoutMs: number;
  logger: Logger;
  /** Counts resume outcomes (metrics). */
  onResume?: (result: string) => void;
}

/**
 * From a request's target to a running sandbox's route: the table first; a sandbox the table
 * does not show running is asked of the orchestrator (it waits for one starting, and resumes a
 * paused one whose policy allows it once the request passed the token). Concurrent requests
 * for one sandbox share one ask.
 */
export class RouteResolver {
  private readonly inflight = new Map<string, Promise<SandboxRoute>>();

  constructor(private readonly o: RouteResolverOptions) {}

  /**
   * The running route from the table alone, without a promise (the per-request path), or
   * undefined when the orchestrator must be asked (resolve). Throws AccessDenied.
   */
  resolveNow(target: RouteTarget, token: string | undefined): SandboxRoute | undefined {
    const known = this.o.table.get(target.sandboxId);
    if (known?.state !== RouteState.ROUTE_STATE_RUNNING) return undefined;
    this.checkToken(known, target, token);
    return known;
  }

  /** Resolves to a running route the request may use, or throws a ProxyError. */
  async resolve(target: RouteTarget, token: string | undefined): Promise<SandboxRoute> {
    const { sandboxId, port } = target;
    const known = this.o.table.get(sandboxId);
    if (known) this.checkToken(known, target, token);
    if (known?.state === RouteState.ROUTE_STATE_RUNNING) return known;
    if (known?.state === RouteState.ROUTE_STATE_PAUSED && known.autoResumePolicy !== AUTO_RESUME_ANY) {
      throw new SandboxNotRunning(
        sandboxId,
        port,
        `paused, and its auto_resume policy (${known.autoResumePolicy || 'unset'}) does not allow resume on request`,
      );
    }
    // Unknown (not yet seen: a create that just returned), starting, pausing, or paused and resumable.
    const allowResume = known !== undefined;
    const route = await this.ask(target, allowResume);
    this.checkToken(route, target, token);
    return route;
  }

  private checkToken(route: SandboxRoute, target: RouteTarget, token: string | undefined): void {
    const expected = route.trafficAccessToken;
    if (expected === undefined || expected === '') return;
    if (token === undefined) throw new AccessDenied(target.sandboxId, target.port, true);
    if (!tokenMatches(expected, token)) throw new AccessDenied(target.sandboxId, target.port, false);
  }

  private ask(target: RouteTarget, allowResume: boolean): Promise<SandboxRoute> {
    const key = `${allowResume ? 'r' : 'w'}:${target.sandboxId}`;
    let p = this.inflight.get(key);
    if (!p) {
      p = this.call(target, allowResume).finally(() => this.inflight.delete(key));
      this.inflight.set(key, p);
    }
    return p;
  }

  private call(target: RouteTarget, allowResume: boolean): Promise<SandboxRoute> {
    const { sandboxId, port } = target;
    const { routing, resumeTimeoutMs } = this.o;
    const started = Date.now();
    return new Promise<SandboxRoute>((resolve, reject) => {
      routing.resume(
        { sandboxId, allowResume },
        new Metadata(),
        { deadline: Date.now() + resumeTimeoutMs },
        (err: ServiceError | null, route?: SandboxRoute) => {
          if (!err && route) {
            if (allowResume) {
              this.o.onResume?.('ok');
              this.o.logger.info({ sandboxId, ms: Date.now() - started }, 'sandbox ready for request');
            }
            this.o.table.upsert(route);
            resolve(route);
            return;
          }
          reject(this.translate(err, sandboxId, port, allowResume));
        },
      );
    });
  }

  private translate(err: ServiceError | null, sandboxId: string, port: number, allowResume: boolean): Error {
    const code = err?.code ?? status.UNKNOWN;
    const details = err?.details || err?.message || 'no answer';
    const result = status[code]?.toLowerCase() ?? 'unknown';
    if (allowResume) this.o.onResume?.(result);
    if (code === status.NOT_FOUND) return new SandboxUnknown(sandboxId, port);
    if (code === status.FAILED_PRECONDITION) return new SandboxNotRunning(sandboxId, port, details);
    if (code === status.DEADLINE_EXCEEDED) {
      return new UpstreamTimeout(sandboxId, port, `not running after ${this.o.resumeTimeoutMs} ms`);
    }
    if (code === status.UNAVAILABLE && !allowResume) {
      // The orchestrator is away (restarting) and the table never had this id.
      return new SandboxUnknown(sandboxId, port);
    }
    this.o.logger.warn({ sandboxId, port, code: result, err: details }, 'resume on request failed');
    return new ResumeFailed(sandboxId, port, code === status.UNAVAILABLE ? 'orchestrator unavailable' : details);
  }
}
