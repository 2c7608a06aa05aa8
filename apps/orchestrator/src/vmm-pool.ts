import { randomUUID } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '#logging';
import type { NetSlot } from '#proto/sbx/net';
import type { SlotProvider } from './node-services.js';
import type { IdleVmmHandle, VmmLauncher } from './vmm-launcher.js';

export interface VmmPoolOptions {
  /** VMMs kept waiting; 0 turns the pool off (every create starts its own). */
  size: number;
  launcher: VmmLauncher;
  slots: SlotProvider;
  /** Where the waiting VMMs' API sockets go: the reconciler's stray-VMM sweep covers it after a crash. */
  socketDir: string;
  /** Their log files until a sandbox takes them. */
  logDir: string;
  /** What each waiting VMM covers with an empty tmpfs; a create links its rootfs there. */
  vmRootfsDir: string;
  /** After a failed start, before the next try (a broken VMM binary must not spin). */
  retryDelayMs?: number;
  logger: Logger;
}

/** A started VMM in the network slot it was started in, waiting on its API socket. */
export interface PooledVmm {
  /** The owner name its slot and cgroup were taken under. */
  id: string;
  slot: NetSlot;
  vmm: IdleVmmHandle;
}

/**
 * VMMs started ahead, each in a network slot of its own (a VMM enters the slot's namespace
 * when it starts and cannot move later), so that a create only links the rootfs and loads:
 * the process start (hundreds of ms for the double's Node, tens for Firecracker) is off the
 * create path. Bounded, refilled one at a time in the background, and emptied on close.
 * A crash leaves waiting VMMs and their slots behind: the restart reconciler finds the VMMs
 * by their API socket in socketDir and the slots by their unknown owner, and gives both back.
 */
export class VmmPool {
  private readonly ready: PooledVmm[] = [];
  private filling: Promise<void> | undefined;
  private closed = false;
  private failures = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private leftoversCleared: Promise<void> | undefined;

  constructor(private readonly o: VmmPoolOptions) {}

  get enabled(): boolean {
    return this.o.size > 0 && this.o.launcher.launchIdle !== undefined;
  }

  /** How many VMMs the pool keeps waiting. */
  get size(): number {
    return this.o.size;
  }

  /** How many wait now (status, bench, tests). */
  get waiting(): number {
    return this.ready.length;
  }

  /** Begins filling; returns at once. */
  start(): void {
    this.refill();
  }

  /**
   * A waiting VMM for a create, or undefined when none is ready (the create starts its own).
   * The pool is not refilled here: starting a VMM (a process, a slot from net-agent) takes the
   * CPU the create needs on a small node; the create calls `refill` once it has answered.
   */
  take(): PooledVmm | undefined {
    let entry: PooledVmm | undefined;
    while ((entry = this.ready.shift()) && !entry.vmm.isAlive()) {
      // Died while waiting: its exit watcher gives the slot back.
    }
    return entry;
  }

  /** Waits for a start in flight, then kills every waiting VMM and gives its slot back. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    await this.filling;
    const all = this.ready.splice(0);
    await Promise.allSettled(all.map((e) => this.discard(e)));
  }

  /** Starts VMMs in the background until the pool is full again; returns at once. */
  refill(): void {
    if (!this.enabled || this.closed || this.filling || this.retryTimer) return;
    if (this.ready.length >= this.o.size) return;
    this.filling = (async () => {
      await (this.leftoversCleared ??= this.clearLeftovers());
      while (!this.closed && this.ready.length < this.o.size) {
        if (!(await this.startOne())) break;
      }
    })().finally(() => {
      this.filling = undefined;
      if (this.failures > 0 && !this.closed) {
        const delay = Math.min((this.o.retryDelayMs ?? 1000) * 2 ** Math.min(this.failures - 1, 5), 30_000);
        this.retryTimer = setTimeout(() => {
          this.retryTimer = undefined;
          this.refill();
        }, delay);
        this.retryTimer.unref();
      }
    });
  }

  /**
   * Log files of VMMs that waited in a previous run's pool (a taken VMM's logs move to its
   * sandbox): their VMMs were killed by the restart reconciler, which runs before start().
   */
  private async clearLeftovers(): Promise<void> {
    await rm(this.o.logDir, { recursive: true, force: true });
    await mkdir(this.o.logDir, { recursive: true });
  }

  /** One VMM in one fresh slot; false after a failure (logged, retried later). */
  private async startOne(): Promise<boolean> {
    const id = `vmm-pool-${randomUUID().slice(0, 13)}`;
    const log = this.o.logger.child({ pooledVmm: id });
    let slot: NetSlot | undefined;
    const sockets = {
      api: join(this.o.socketDir, `${id}.api.sock`),
      stdout: join(this.o.logDir, `${id}.stdout.log`),
      stderr: join(this.o.logDir, `${id}.stderr.log`),
    };
    try {
      // Marked pooled: when every service stops at once, this pool's Release cannot reach a
      // stopping net-agent, which frees the slot by itself once the VMM is gone.
      slot = await this.o.slots.acquire(id, undefined, true);
      const vmm = await this.o.launcher.launchIdle!(
        {
          sandboxId: id,
          apiSocket: sockets.api,
          rootfsDir: this.o.vmRootfsDir,
          namespace: slot.namespace,
          stdoutPath: sockets.stdout,
          stderrPath: sockets.stderr,
        },
        log,
      );
      const entry: PooledVmm = { id, slot, vmm };
      if (this.closed) {
        await this.discard(entry);
        return false;
      }
      this.ready.push(entry);
      this.failures = 0;
      void vmm.exited.then(async (how) => {
        const at = this.ready.indexOf(entry);
        if (at < 0) return; // taken by a sandbox, or discarded
        this.ready.splice(at, 1);
        log.warn({ how }, 'waiting VMM ended; its slot goes back');
        await this.discard(entry);
        this.refill();
      });
      log.debug({ pid: vmm.pid, slot: slot.idx, waiting: this.ready.length }, 'VMM waiting in the pool');
      return true;
    } catch (err) {
      this.failures++;
      log.error({ err: (err as Error).message, failures: this.failures }, 'starting a pooled VMM failed');
      if (slot) await this.o.slots.release(slot, true).catch(() => undefined);
      await Promise.all(Object.values(sockets).map((p) => rm(p, { force: true })));
      return false;
    }
  }

  private async discard(entry: PooledVmm): Promise<void> {
    const { id, vmm, slot } = entry;
    try {
      await vmm.kill();
    } finally {
      await this.o.slots.release(slot, true).catch((err: unknown) => {
        this.o.logger.warn({ err: (err as Error).message, slot: slot.idx }, 'giving back a pooled slot failed');
      });
      await rm(vmm.apiSocket, { force: true });
      const base = join(this.o.logDir, id);
      await rm(`${base}.stdout.log`, { force: true });
      await rm(`${base}.stderr.log`, { force: true });
    }
  }
}
