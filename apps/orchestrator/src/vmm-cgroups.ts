import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, readdir, readFile, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '#logging';

/**
 * A cgroup (v2) of its own for each VMM, outside the orchestrator's. Nomad stops a task by
 * killing every process in the task's cgroup, and a child process starts in its parent's
 * cgroup: without this, restarting the orchestrator under Nomad kills every sandbox, however
 * detached the VMMs are. The VMM's start script moves itself in before it execs the VMM, so
 * nothing of it ever runs in the orchestrator's cgroup.
 *
 * Layout: `{parent}/{node}/{sandboxId}-{random}`, where `node` stands for this orchestrator's
 * data directory, so that two orchestrators on one machine (tests) never sweep each other's.
 */
export class VmmCgroups {
  private constructor(
    /** This orchestrator's directory of VMM cgroups. */
    readonly root: string,
    private readonly logger: Logger,
  ) {}

  /**
   * `auto`: under `{cgroup2 mount}/sbx-vmm` when cgroup v2 is mounted, else none (logged);
   * `off`: none; anything else: that directory (inside a cgroup2 mount) as the parent.
   */
  static choose(setting: string, dataDir: string, logger: Logger): VmmCgroups | undefined {
    if (setting === 'off') return undefined;
    let parent = setting;
    if (setting === 'auto') {
      const mount = cgroup2Mount();
      if (!mount) {
        logger.warn('no cgroup v2 mount: VMMs stay in the orchestrator cgroup (a Nomad restart of it kills them)');
        return undefined;
      }
      parent = join(mount, 'sbx-vmm');
    }
    const node = createHash('sha256').update(dataDir).digest('hex').slice(0, 12);
    return new VmmCgroups(join(parent, node), logger);
  }

  /** Makes a fresh cgroup for one VMM; the start script moves the VMM into it. */
  async create(sandboxId: string): Promise<string> {
    const safe = sandboxId.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64);
    const path = join(this.root, `${safe}-${randomBytes(3).toString('hex')}`);
    try {
      await mkdir(path, { recursive: true });
    } catch (err) {
      // remove() may have taken the emptied node directory away between its mkdir and ours.
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      await mkdir(path, { recursive: true });
    }
    return path;
  }

  /** Kills everything in a VMM's cgroup at once (cgroup.kill, Linux 5.14+); false when that is not possible. */
  async kill(path: string): Promise<boolean> {
    try {
      await writeFile(join(path, 'cgroup.kill'), '1');
      return true;
    } catch {
      return false;
    }
  }

  /** Removes a VMM's cgroup once its processes are gone (a cgroup with processes cannot be removed). */
  async remove(path: string): Promise<void> {
    if (!(await removeCgroup(path))) {
      this.logger.warn({ cgroup: path }, 'removing a VMM cgroup failed: processes still in it');
      return;
    }
    // The node directory goes with its last VMM; the next launch makes it again. While another
    // VMM's cgroup is in it (a sandbox, a VMM waiting in the pool) rmdir answers EBUSY for as long
    // as that VMM lives: not retried, or every kill would wait out removeCgroup's 2 s.
    const others = (await readdir(this.root, { withFileTypes: true }).catch(() => [])).some((d) => d.isDirectory());
    if (!others) await removeCgroup(this.root);
  }

  /** The cgroup of a running VMM when it is one of ours (an adopted VMM's). */
  async of(pid: number): Promise<string | undefined> {
    const line = (await readFile(`/proc/${pid}/cgroup`, 'utf8').catch(() => ''))
      .split('\n')
      .find((l) => l.startsWith('0::'));
    const mount = cgroup2Mount();
    if (!line || !mount) return undefined;
    const path = join(mount, line.slice(3));
    return path.startsWith(this.root + '/') ? path : undefined;
  }

  /** Removes the cgroups of VMMs that ended while no orchestrator watched them (empty ones). */
  async sweep(): Promise<number> {
    let removed = 0;
    for (const name of await readdir(this.root).catch(() => [] as string[])) {
      const path = join(this.root, name);
      // A fresh one may be waiting for its VMM to move in (the start script does it at once).
      const made = await stat(path).catch(() => undefined);
      if (!made?.isDirectory() || Date.now() - made.mtimeMs < FRESH_MS) continue;
      const procs = await readFile(join(path, 'cgroup.procs'), 'utf8').catch(() => undefined);
      if (procs === undefined || procs.trim()) continue;
      await this.remove(path);
      removed++;
    }
    return removed;
  }
}

const FRESH_MS = 60_000;

/**
 * rmdir, retried while the kernel still holds the cgroup (EBUSY: for a moment after its last
 * process is reaped, and while a removed child is dying). True when it is gone.
 */
async function removeCgroup(path: string): Promise<boolean> {
  for (let attempt = 0; attempt < 100; attempt++) {
    try {
      await rmdir(path);
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return true;
      if (code !== 'EBUSY') return false;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return false;
}

/** Where cgroup v2 is mounted (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid one). */
function cgroup2Mount(): string | undefined {
  for (const line of readFileSync('/proc/mounts', 'utf8').split('\n')) {
    const [, mountPoint, type] = line.split(' ');
    if (type === 'cgroup2' && mountPoint) return mountPoint;
  }
  return undefined;
}
