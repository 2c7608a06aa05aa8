import type { Logger } from '#logging';
import { RouteState, type SandboxRoute } from '#proto/sbx/routing';
import { SandboxBusy, SandboxExists, SandboxNotFound } from './orchestrator-errors.js';
import type { PausedSandboxes } from './paused-sandboxes.js';
import type { RouteFeed } from './route-feed.js';
import type { CreateRequest } from './sandbox-manager.js';

/** E2B's policy value that lets a request resume a paused sandbox ("off" or unset does not). */
export const AUTO_RESUME_ANY = 'any';

export interface AutoResumeOptions {
  feed: RouteFeed;
  paused: PausedSandboxes;
  create: (request: CreateRequest) => Promise<unknown>;
  logger: Logger;
  /** How often a wait for a starting or pausing sandbox looks again. */
  pollMs?: number;
}

/**
 * Resume on request (DESIGN.md §9): the proxy asks for a sandbox it cannot route. A running one
 * is answered at once; one starting or pausing is waited for; a paused one whose auto_resume
 * policy is `any` is resumed from the build its pause made. Concurrent asks for one sandbox
 * share one resume.
 */
export class AutoResume {
  private readonly inflight = new Map<string, Promise<SandboxRoute>>();

  constructor(private readonly o: AutoResumeOptions) {}

  /** `allowResume` false: a paused sandbox is refused instead of resumed (the caller has not checked its token). */
  resume(sandboxId: string, deadline: number, allowResume: boolean): Promise<SandboxRoute> {
    const key = `${allowResume ? 'r' : 'w'}:${sandboxId}`;
    let p = this.inflight.get(key);
    if (!p) {
      p = this.run(sandboxId, deadline, allowResume).finally(() => this.inflight.delete(key));
      this.inflight.set(key, p);
    }
    return p;
  }

  private async run(sandboxId: string, deadline: number, allowResume: boolean): Promise<SandboxRoute> {
    const pollMs = this.o.pollMs ?? 50;
    for (;;) {
      const route = this.o.feed.route(sandboxId);
      if (!route) throw new SandboxNotFound(sandboxId);
      if (route.state === RouteState.ROUTE_STATE_RUNNING) return route;
      if (route.state === RouteState.ROUTE_STATE_PAUSED) {
        const paused = this.o.paused.get(sandboxId)!;
        const policy = paused.config.autoResume?.policy ?? '';
        if (policy !== AUTO_RESUME_ANY) {
          throw new SandboxBusy(sandboxId, `paused (auto_resume policy '${policy || 'unset'}')`, 'resume on request');
        }
        if (!allowResume) throw new SandboxBusy(sandboxId, 'paused', 'resume without allow_resume');
        const log = this.o.logger.child({ sandboxId });
        log.info({ buildId: paused.buildId }, 'resuming on request (auto_resume)');
        const now = new Date();
        try {
          await this.o.create({
            config: { ...paused.config, buildId: paused.buildId, snapshot: true },
            startTime: now,
            endTime: new Date(now.getTime() + paused.timeoutMs),
          });
        } catch (err) {
          // Someone else (the control plane) resumed it meanwhile: wait for that one instead.
          if (!(err instanceof SandboxExists)) throw err;
        }
        continue;
      }
      if (Date.now() >= deadline) {
        throw new SandboxBusy(sandboxId, RouteState[route.state].replace('ROUTE_STATE_', '').toLowerCase(), 'route');
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }
}
