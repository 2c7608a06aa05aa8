import type { BuildFiles, LocalBuild } from './build-files.js';

export interface CachedBuild {
  buildId: string;
  expiresAt: Date;
}

/**
 * Builds this node has resolved (templates and paused snapshots), each kept for a TTL that
 * every use refreshes, like the seed's template cache; `ListCachedBuilds` reports them with
 * their expiry. Concurrent resolves of one build share one fetch.
 */
export class TemplateCache {
  private readonly entries = new Map<string, { build: LocalBuild; expiresAt: number }>();
  private readonly pending = new Map<string, Promise<LocalBuild>>();

  constructor(
    private readonly files: BuildFiles,
    private readonly ttlMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  async resolve(buildId: string): Promise<LocalBuild> {
    const hit = this.entries.get(buildId);
    if (hit && hit.expiresAt > this.now()) {
      hit.expiresAt = this.now() + this.ttlMs;
      return hit.build;
    }
    let fetching = this.pending.get(buildId);
    if (!fetching) {
      fetching = this.files.fetch(buildId).finally(() => this.pending.delete(buildId));
      this.pending.set(buildId, fetching);
    }
    const build = await fetching;
    this.entries.set(buildId, { build, expiresAt: this.now() + this.ttlMs });
    return build;
  }

  /** A build a pause just wrote: usable here at once. */
  add(build: LocalBuild): void {
    this.entries.set(build.buildId, { build, expiresAt: this.now() + this.ttlMs });
  }

  has(buildId: string): boolean {
    const hit = this.entries.get(buildId);
    return hit !== undefined && hit.expiresAt > this.now();
  }

  list(): CachedBuild[] {
    this.sweep();
    return [...this.entries.entries()]
      .map(([buildId, e]) => ({ buildId, expiresAt: new Date(e.expiresAt) }))
      .sort((a, b) => a.buildId.localeCompare(b.buildId));
  }

  sweep(): void {
    const now = this.now();
    for (const [id, e] of this.entries) if (e.expiresAt <= now) this.entries.delete(id);
  }
}
