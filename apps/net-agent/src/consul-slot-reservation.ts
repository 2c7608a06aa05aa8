import { randomInt, randomUUID } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import { hostname } from 'node:os';
import Consul from 'consul';
import {
  ReservationUnavailable,
  SlotAlreadyReleased,
  SlotReallocated,
  SlotsExhausted,
  type ReservedSlot,
  type SlotReservation,
} from './slot-reservation.js';

export interface ConsulSlotReservationOptions {
  /** `http://host:port`, `https://host:port`, `host:port` or `unix:///path` (CONSUL_HTTP_ADDR forms). */
  address: string;
  token?: string;
  /** Keys are `{prefix}{nodeId}/{idx}`. */
  prefix: string;
  nodeId: string;
  first: number;
  count: number;
  timeoutMs: number;
  /** Random create-only tries before falling back to a listing (the seed uses 10). */
  randomTries?: number;
}

/**
 * Slot reservation in Consul KV, after the seed's storage_kv.go: a slot is taken by creating its
 * key with `?cas=0` (create-only: fails when the key exists), first at random indexes, then by
 * walking the free indexes of a key listing; it is released by deleting the key only if it still
 * has the ModifyIndex read just before (a check-index + delete transaction), so a key someone else
 * re-created is never deleted and of two releases of one slot exactly one succeeds.
 */
export class ConsulSlotReservation implements SlotReservation {
  readonly kind = 'consul';
  private readonly consul: Consul;
  private readonly store: string;
  private readonly base: string;
  /** Creates that timed out and were not found on read-back: key → the value we wrote. */
  private readonly uncertain = new Map<string, string>();

  constructor(private readonly options: ConsulSlotReservationOptions) {
    this.consul = createConsulClient(options.address, options.token, options.timeoutMs);
    this.store = `consul ${options.address}`;
    this.base = `${options.prefix}${options.nodeId}/`;
  }

  keyOf(idx: number): string {
    return `${this.base}${idx}`;
  }

  async reserve(): Promise<ReservedSlot> {
    const { first, count } = this.options;
    const tries = Math.min(this.options.randomTries ?? 10, count);
    for (let i = 0; i < tries; i++) {
      const idx = first + randomInt(count);
      if (await this.create(idx)) return { idx, key: this.keyOf(idx) };
    }
    // Nearly full: list what is taken and walk the rest. Without a lock another node may win an
    // index between the listing and our CAS; the CAS then fails and we move on.
    const taken = new Set((await this.listKeys()).map((k) => k.slice(this.base.length)));
    const start = randomInt(count);
    for (let i = 0; i < count; i++) {
      const idx = first + ((start + i) % count);
      if (taken.has(String(idx))) continue;
      if (await this.create(idx)) return { idx, key: this.keyOf(idx) };
    }
    throw new SlotsExhausted(this.store, count);
  }

  async claim(idx: number): Promise<boolean> {
    return this.create(idx);
  }

  async release(slot: ReservedSlot): Promise<void> {
    const pair = await this.call('read', () => this.consul.kv.get(slot.key));
    if (!pair) throw new SlotAlreadyReleased(slot.idx, slot.key);
    // Not a plain `DELETE ?cas=N`: Consul answers it `true` when the key is already gone (its
    // delete-CAS counts an absent key as deleted), so of two releases racing on one read both
    // would succeed. A transaction whose first step checks the key still exists at that index
    // deletes it only then, and fails (409) otherwise.
    const deleted = await this.call('delete-cas', () =>
      this.transaction([
        { KV: { Verb: 'check-index', Key: slot.key, Index: pair.ModifyIndex } },
        { KV: { Verb: 'delete', Key: slot.key } },
      ]).then(
        () => true,
        (err: unknown) => {
          if ((err as { statusCode?: number }).statusCode === 409) return false;
          throw err;
        },
      ),
    );
    if (deleted) return;
    const now = await this.call('read', () => this.consul.kv.get(slot.key));
    if (!now) throw new SlotAlreadyReleased(slot.idx, slot.key);
    throw new SlotReallocated(slot.idx, slot.key);
  }

  async held(): Promise<ReservedSlot[]> {
    let pairs: Array<{ Key: string; Value: string | null }>;
    try {
      const got = await this.consul.kv.get({ key: this.base, recurse: true });
      pairs = Array.isArray(got) ? got : got ? [got] : [];
    } catch (err) {
      if ((err as { statusCode?: number }).statusCode === 404) return [];
      throw new ReservationUnavailable(this.store, 'list', err);
    }
    const out: ReservedSlot[] = [];
    for (const pair of pairs) {
      const rest = pair.Key.slice(this.base.length);
      if (!/^\d+$/.test(rest)) continue;
      out.push({ idx: Number(rest), key: pair.Key, fromPredecessor: isPredecessor(pair.Value) });
    }
    return out.sort((a, b) => a.idx - b.idx);
  }

  close(): void {
    this.consul.destroy();
  }

  async settle(): Promise<number> {
    let released = 0;
    for (const [key, value] of [...this.uncertain]) {
      const pair = (await this.consul.kv.get(key).catch(() => undefined)) as
        { Value?: string | null; ModifyIndex: number } | undefined;
      if (pair?.Value === value) {
        const idx = Number(key.slice(this.base.length));
        await this.release({ idx, key }).then(
          () => released++,
          () => undefined,
        );
      }
      this.uncertain.delete(key);
    }
    return released;
  }

  private async create(idx: number): Promise<boolean> {
    const key = this.keyOf(idx);
    // A claim id makes the value ours alone, so a create whose answer was lost can be told apart.
    const value = JSON.stringify({ node: this.options.nodeId, ...HOLDER, claim: randomUUID() });
    try {
      return (await this.consul.kv.set({ key, value, cas: 0 })) === true;
    } catch (err) {
      // A timeout loses the answer, not necessarily the write: a create that landed would leave a
      // key nobody releases until the next start's reconcile. Read it back and keep it if it is ours.
      const pair = (await this.consul.kv.get(key).catch(() => undefined)) as { Value?: string | null } | undefined;
      if (pair?.Value === value) return true;
      // Not there yet is not never: on a loaded store the write can land after this read.
      // settle() looks again before the agent stops.
      this.uncertain.set(key, value);
      throw new ReservationUnavailable(this.store, 'create-cas', err);
    }
  }

  /** `PUT /v1/txn` with Consul's own operation shape (the client's typings describe another). */
  private transaction(operations: Array<{ KV: { Verb: string; Key: string; Index?: number } }>): Promise<unknown> {
    const create = this.consul.transaction.create as unknown as (ops: unknown[]) => Promise<unknown>;
    return create.call(this.consul.transaction, operations);
  }

  private async listKeys(): Promise<string[]> {
    try {
      return await this.consul.kv.keys(this.base);
    } catch (err) {
      // Consul answers a listing with no keys under the prefix with 404.
      if ((err as { statusCode?: number }).statusCode === 404) return [];
      throw new ReservationUnavailable(this.store, 'list', err);
    }
  }

  private async call<T>(operation: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw new ReservationUnavailable(this.store, operation, err);
    }
  }
}

const CONSUL_CONNECTIONS = 8;

/**
 * Who wrote a reservation: host name, boot and network namespace. A key left by an earlier run
 * of an agent here (same host, same namespace, or a boot ago) is ours to clean up; a key written
 * from elsewhere under the same node id belongs to a live peer and is left alone.
 */
const HOLDER = {
  host: hostname(),
  boot: readOr('/proc/sys/kernel/random/boot_id'),
  netns: (() => {
    try {
      return statSync('/proc/self/ns/net').ino;
    } catch {
      return 0;
    }
  })(),
  pid: process.pid,
};

function readOr(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return '';
  }
}

function isPredecessor(value: string | null): boolean {
  let holder: Partial<typeof HOLDER>;
  try {
    holder = JSON.parse(value ?? '') as Partial<typeof HOLDER>;
  } catch {
    return true;
  }
  if (!holder.host || holder.host !== HOLDER.host) return !holder.host;
  return holder.boot !== HOLDER.boot || holder.netns === HOLDER.netns;
}

/** A `consul` client for a CONSUL_HTTP_ADDR-style address (http, https, host:port or unix://). */
export function createConsulClient(address: string, token?: string, timeoutMs = 5000): Consul {
  const target = consulTarget(address);
  // A bounded keep-alive pool: a refill batch reserves in parallel, and an unbounded agent would
  // keep one idle connection per parallel request open for good.
  const agentOptions = { keepAlive: true, maxSockets: CONSUL_CONNECTIONS, maxFreeSockets: CONSUL_CONNECTIONS };
  return new Consul({
    ...target,
    agent: target.baseUrl.startsWith('https:') ? new HttpsAgent(agentOptions) : new HttpAgent(agentOptions),
    timeout: timeoutMs,
    ...(token ? { defaults: { token } } : {}),
  } as ConstructorParameters<typeof Consul>[0]);
}

function consulTarget(address: string): { baseUrl: string; socketPath?: string } {
  if (address.startsWith('unix://'))
    return { baseUrl: 'http://consul/v1', socketPath: address.slice('unix://'.length) };
  const url = /^https?:\/\//.test(address) ? address : `http://${address}`;
  return { baseUrl: `${url.replace(/\/+$/, '')}/v1` };
}
