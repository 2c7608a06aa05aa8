import type { Logger } from '#logging';
import type { NameRegistry } from './node-services.js';

/** A running sandbox's name as the orchestrator registered it. */
export interface RegisteredName {
  sandboxId: string;
  ip: string;
}

export interface DnsRecordKeeperOptions {
  intervalMs: number;
  names: NameRegistry;
  /** The names that should be served now: running sandboxes that hold a DNS record. */
  expected(): RegisteredName[];
  /** Whether the sandbox still should have this name (asked again after each set). */
  stillExpected(name: RegisteredName): boolean;
  logger: Logger;
}

/**
 * The dns service keeps records in memory, so a restarted dns answers NXDOMAIN for every
 * running sandbox. This puts back, each interval, the records of running sandboxes that dns
 * no longer has (or has with another IP). A sandbox that started pausing or stopping while a
 * record was being put back gets it removed again, so a paused sandbox never keeps a name.
 */
export class DnsRecordKeeper {
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<unknown> | undefined;

  constructor(private readonly o: DnsRecordKeeperOptions) {}

  start(): void {
    if (this.o.intervalMs <= 0) return;
    this.timer = setInterval(() => {
      this.round ??= this.check().finally(() => (this.round = undefined));
    }, this.o.intervalMs);
    this.timer.unref();
  }

  /** One round; returns the sandbox ids whose records were put back. */
  async check(): Promise<string[]> {
    const expected = this.o.expected();
    if (expected.length === 0) return [];
    let served: Map<string, string>;
    try {
      served = new Map((await this.o.names.list()).map((r) => [r.name, r.ip]));
    } catch (err) {
      this.o.logger.warn({ err: (err as Error).message }, 'dns records could not be listed');
      return [];
    }
    const restored: string[] = [];
    for (const name of expected) {
      if (served.get(name.sandboxId) === name.ip || !this.o.stillExpected(name)) continue;
      try {
        await this.o.names.set(name.sandboxId, name.ip);
        if (!this.o.stillExpected(name)) {
          await this.o.names.remove(name.sandboxId, name.ip);
          continue;
        }
        restored.push(name.sandboxId);
        this.o.logger.info({ sandboxId: name.sandboxId, ip: name.ip }, 'dns record put back');
      } catch (err) {
        this.o.logger.warn({ sandboxId: name.sandboxId, err: (err as Error).message }, 'dns record not put back');
      }
    }
    return restored;
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.round;
  }
}
