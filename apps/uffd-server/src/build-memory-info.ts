import type { Header, PrefetchSet } from '#storage';

/** What a build's memory file is (its header) and the set recorded for it, as read from the build. */
export interface BuildMemoryFacts {
  header: Header;
  /** Undefined: the build has none (or it was unusable, already warned about). */
  prefetchSet: PrefetchSet | undefined;
}

/** What a load returns: `keep` false when an answer may change (a read failed for now, not for good). */
export interface LoadedFacts extends BuildMemoryFacts {
  keep: boolean;
}

/**
 * The headers and recorded prefetch sets of the builds served lately, kept after their last
 * sandbox: builds are immutable once visible (a set is written into the staged build, before
 * its snapfile), so the next sandbox of the build skips reading and decoding them (a Prepare
 * spent about a quarter of a millisecond of CPU on the two files, bench/density/prepare.sh).
 * Bounded: the least recently used build goes first.
 */
export class BuildMemoryInfo {
  private readonly known = new Map<string, BuildMemoryFacts>();

  constructor(private readonly capacity = 16) {}

  async get(buildId: string, load: () => Promise<LoadedFacts>): Promise<BuildMemoryFacts> {
    const hit = this.known.get(buildId);
    if (hit) {
      this.known.delete(buildId);
      this.known.set(buildId, hit);
      return hit;
    }
    const { keep, ...facts } = await load();
    if (keep) {
      this.known.set(buildId, facts);
      for (const oldest of this.known.keys()) {
        if (this.known.size <= this.capacity) break;
        this.known.delete(oldest);
      }
    }
    return facts;
  }

  get size(): number {
    return this.known.size;
  }
}
