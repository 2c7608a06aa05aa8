import { statSync } from 'node:fs';
import { normalizeBuildId, type LayeredFile, type PrefetchSet } from '#storage';
import type { SourceView } from './source-view.js';

/** A memory file laid out once in this process, with what every sandbox of it needs from the build. */
export interface SharedSource {
  view: SourceView;
  /** The memfile header's block size (builds only). */
  blockSize?: number;
  /** The build's recorded prefetch set, checked against its header (builds only). */
  prefetchSet?: PrefetchSet;
  /** The build's layers (builds only): their chunk caches are what the view maps. */
  file?: LayeredFile;
}

/** What a caller holds: close `source.view` once when done (the last holder unmaps it). */
export interface AcquiredSource {
  source: SharedSource;
  /** This call laid the memory file out (the first holder): one-time work (a bucket prefetch) goes here. */
  opened: boolean;
}

/**
 * The memory files this process serves, one mapping each, shared by every sandbox of it. Each
 * sandbox mapping the same build on its own made every page-cache page it copied into a guest
 * count once per mapping in our RSS (2.2 MiB per sandbox at 100 sandboxes of one 128 MiB build,
 * bench/density): one mapping counts it once. Builds are immutable, so a build is known by its
 * id; a plain memory file (serve a path as it is) by its identity on disk (device, inode, size,
 * modification time), so a file replaced at the same path is mapped anew. The mapping goes with
 * the last sandbox using it (a build's header and prefetch set are kept apart: build-memory-info.ts).
 */
export class SharedSources {
  private readonly entries = new Map<string, Promise<SharedSource>>();

  /** Key of a build's memory file. */
  static buildKey(buildId: string): string {
    return `build:${normalizeBuildId(buildId)}`;
  }

  /** Key of a plain memory file: its identity on disk now (throws ENOENT like opening it would). */
  static fileKey(path: string): string {
    const st = statSync(path, { bigint: true });
    return `file:${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}`;
  }

  /**
   * The source under `key`, opened with `open` when no sandbox holds it (concurrent callers
   * share one opening; a failed opening is not kept, the next caller tries again).
   */
  async acquire(key: string, open: () => Promise<SharedSource>): Promise<AcquiredSource> {
    for (;;) {
      let entry = this.entries.get(key);
      let opened = false;
      if (!entry) {
        opened = true;
        entry = open().then(
          (source) => {
            source.view.onUnmapped(() => {
              if (this.entries.get(key) === entry) this.entries.delete(key);
            });
            return source;
          },
          (err: unknown) => {
            if (this.entries.get(key) === entry) this.entries.delete(key);
            throw err;
          },
        );
        this.entries.set(key, entry);
      }
      const source = await entry;
      // The opener keeps the view's first hold; the others add theirs. The last holder may have
      // let go while this caller waited: then it is opened again.
      if (opened) return { source, opened };
      if (source.view.isClosed) continue;
      source.view.retain();
      return { source, opened };
    }
  }

  /** Memory files mapped now. */
  get size(): number {
    return this.entries.size;
  }
}
