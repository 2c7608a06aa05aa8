import { readdir, readlink, stat } from 'node:fs/promises';
import { writeFileSync } from 'node:fs';
import type { Logger } from '#logging';
import { checkResult, CommandFailed, runCommand, startCommand } from './command-runner.js';
import { configureNamespaceLinks } from './namespace-netlink.js';
import { NetnsSwitch, NftFailed, NftLibrary } from '#native';
import type { SlotLayout, SlotSpec } from './slot-layout.js';
import {
  hostCreateBatch,
  hostElements,
  hostRemoveBatch,
  hostSetElements,
  hostTableDelete,
  hostTableRuleset,
  namespaceBatch,
  namespaceRuleset,
  type SlotRulesConfig,
} from './slot-scripts.js';
import { TypedError } from '#service-kit';

/** Where `ip netns add` registers named namespaces (iproute2's NETNS_RUN_DIR). */
export const NETNS_DIR = '/run/netns';

export class SlotCreateFailed extends TypedError {
  readonly code = 'SLOT_CREATE_FAILED';
  constructor(
    readonly slots: number[],
    readonly step: string,
    override readonly cause: unknown,
  ) {
    super(`creating slots ${summarize(slots)} failed at ${step}: ${(cause as Error)?.message ?? String(cause)}`);
  }
}

export class SlotRemoveFailed extends TypedError {
  readonly code = 'SLOT_REMOVE_FAILED';
  constructor(
    readonly slots: number[],
    readonly leftovers: string[],
  ) {
    super(`removing slots ${summarize(slots)} left ${leftovers.slice(0, 20).join(', ')}`);
  }
}

export class NamespaceLinksFailed extends TypedError {
  readonly code = 'NAMESPACE_LINKS_FAILED';
  constructor(
    readonly namespace: string,
    override readonly cause: unknown,
  ) {
    super(`setting up links in ${namespace}: ${(cause as Error)?.message ?? String(cause)}`);
  }
}

export class UplinkNotFound extends TypedError {
  readonly code = 'UPLINK_NOT_FOUND';
  constructor(readonly detail: string) {
    super(`cannot find the uplink interface: ${detail}; set --uplink`);
  }
}

export interface SlotNetworkOptions {
  layout: SlotLayout;
  rules: SlotRulesConfig;
  hostTable: string;
  uplink: string;
  removalGroup: number;
  /** `netlink`: a slot namespace's links are set up with syscalls in this process; `ip`: with `ip -batch`. */
  namespaceSetup?: 'netlink' | 'ip';
  /** `library`: nftables transactions through libnftables in this process; `process`: `nft -f`. */
  nftMode?: 'library' | 'process';
  logger: Logger;
}

/** What a scan of the agent's namespace finds that follows our naming. */
export interface HostScan {
  namespaces: Map<number, string>;
  hostVeths: Map<number, string>;
  /** Slot indexes whose namespace some process (a VMM) is still running in. */
  inUse: Set<number>;
}

/**
 * Builds and removes slots in the agent's network namespace (the node's). Host-side work for a
 * batch of slots is one `ip -batch` and one nft transaction; each slot's namespace gets one
 * `ip -batch` and one nft transaction, all namespaces of a batch in parallel.
 */
export class SlotNetwork {
  private readonly netns = new NetnsSwitch();
  /** Removals share the interface group, so they run one at a time. */
  private removing: Promise<unknown> = Promise.resolve();
  private readonly nft: NftLibrary | undefined;

  constructor(private readonly options: SlotNetworkOptions) {
    this.nft = options.nftMode === 'process' ? undefined : NftLibrary.load();
    if (!this.nft && options.nftMode !== 'process') {
      options.logger.warn('libnftables.so.1 not loadable: running the nft command for each transaction');
    }
  }

  /** One nft transaction in the agent's own namespace. */
  private async hostNft(text: string, where: string): Promise<void> {
    if (this.nft) await this.nft.context(where).run(text);
    else await runCommand('nft', ['-f', '-'], text, where);
  }

  get uplink(): string {
    return this.options.uplink;
  }

  /** The interface of the IPv4 default route in the agent's namespace. */
  static async detectUplink(): Promise<string> {
    const out = await runCommand('ip', ['-j', '-4', 'route', 'show', 'default']);
    const routes = JSON.parse(out || '[]') as Array<{ dev?: string }>;
    const dev = routes.find((r) => r.dev)?.dev;
    if (!dev) throw new UplinkNotFound('no IPv4 default route in this network namespace');
    return dev;
  }

  /** Enables forwarding and installs the host table, with the host rules of adopted slots in it. */
  async init(adopted: SlotSpec[], enableForwarding: boolean): Promise<void> {
    if (enableForwarding) writeFileSync('/proc/sys/net/ipv4/ip_forward', '1');
    await this.hostNft(
      hostTableRuleset({ hostTable: this.options.hostTable, uplink: this.options.uplink }, adopted),
      'host table',
    );
  }

  async removeHostTable(): Promise<void> {
    await this.hostNft(hostTableDelete(this.options.hostTable), 'host table');
  }

  /** Creates all slots of a batch, or none: on failure whatever was built is removed again. */
  async createMany(slots: SlotSpec[]): Promise<void> {
    if (!slots.length) return;
    const ids = slots.map((s) => s.idx);
    // Never build over (or, on failure, tear down) a namespace this batch did not make.
    const existing = new Set(await readdir(NETNS_DIR).catch(() => [] as string[]));
    const clash = slots.filter((s) => existing.has(s.namespace)).map((s) => s.namespace);
    if (clash.length)
      throw new SlotCreateFailed(ids, 'check', new Error(`namespaces already exist: ${clash.join(', ')}`));
    let step = 'host links';
    try {
      await runCommand('ip', ['-batch', '-'], hostCreateBatch(slots), 'host');
      step = 'namespace setup';
      // Settle every namespace before any clean-up, so nothing is still configuring one we remove.
      const setups = await Promise.allSettled(slots.map((s) => this.configureNamespace(s)));
      const failed = setups.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      step = 'host rules';
      await this.hostNft(hostElements('add', this.options.hostTable, slots), 'host');
    } catch (err) {
      await this.removeMany(slots, { hostRules: false }).catch((cleanupErr: unknown) =>
        this.options.logger.error({ err: cleanupErr, slots: ids }, 'cleanup after a failed create left something'),
      );
      throw new SlotCreateFailed(ids, step, err);
    }
  }

  private async configureNamespace(s: SlotSpec): Promise<void> {
    const path = `${NETNS_DIR}/${s.namespace}`;
    const viaIp = this.options.namespaceSetup === 'ip';
    const [rules, links] = this.netns.run(path, () => {
      // Per-namespace sysctl: /proc/sys/net resolves against the calling thread's namespace.
      writeFileSync('/proc/sys/net/ipv4/ip_forward', '1');
      // nft first: its transaction waits out a kernel grace period while the links are set up.
      const ruleset = namespaceRuleset(s, this.options.rules);
      const nft = this.nft
        ? this.nft.context(s.namespace).run(ruleset)
        : checkResult(startCommand('nft', ['-f', '-'], ruleset), 'nft -f', s.namespace);
      if (!viaIp) {
        try {
          configureNamespaceLinks(s);
        } catch (err) {
          return [nft, Promise.reject(new NamespaceLinksFailed(s.namespace, err))] as const;
        }
        return [nft, undefined] as const;
      }
      return [
        nft,
        checkResult(startCommand('ip', ['-batch', '-'], namespaceBatch(s)), 'ip -batch', s.namespace),
      ] as const;
    });
    const results = await Promise.allSettled([rules, links]);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /**
   * Removes slots: host veths (with their peers, addresses and routes), namespaces (with
   * everything in them) and host rules. Tolerates pieces already gone; throws SlotRemoveFailed
   * naming what is still there afterwards.
   */
  removeMany(slots: SlotSpec[], opts: { hostRules?: boolean } = {}): Promise<void> {
    const run = this.removing.then(() => this.removeNow(slots, opts.hostRules ?? true));
    this.removing = run.catch(() => undefined);
    return run;
  }

  private async removeNow(slots: SlotSpec[], hostRules: boolean): Promise<void> {
    if (!slots.length) return;
    if (hostRules) await this.deleteHostElements(slots);
    // -force: keep going past pieces that are already gone; what is left is checked below.
    await startCommand('ip', ['-force', '-batch', '-'], hostRemoveBatch(slots, this.options.removalGroup));
    const scan = await this.scan(false);
    const leftovers: string[] = [];
    for (const s of slots) {
      if (scan.hostVeths.has(s.idx)) leftovers.push(s.hostVeth);
      if (scan.namespaces.has(s.idx)) leftovers.push(s.namespace);
    }
    if (leftovers.length)
      throw new SlotRemoveFailed(
        slots.map((s) => s.idx),
        leftovers,
      );
  }

  private async deleteHostElements(slots: SlotSpec[]): Promise<void> {
    const table = this.options.hostTable;
    try {
      await this.hostNft(hostElements('delete', table, slots), 'host');
    } catch (err) {
      if (!(err instanceof CommandFailed) && !(err instanceof NftFailed)) throw err;
      // A transaction fails whole when one element is missing: delete only those present.
      const present = await this.hostElementsPresent();
      const text = hostSetElements(
        'delete',
        table,
        slots.map((s) => s.hostVeth).filter((v) => present.veths.has(v)),
        slots.map((s) => s.hostIp).filter((ip) => present.ips.has(ip)),
      );
      if (text) await this.hostNft(text, 'host');
    }
  }

  /** The host table's set contents (both empty when the table does not exist). */
  async hostElementsPresent(): Promise<{ veths: Set<string>; ips: Set<string> }> {
    const veths = new Set<string>();
    const ips = new Set<string>();
    const res = await startCommand('nft', ['-j', 'list', 'table', 'ip', this.options.hostTable], '');
    if (res.exitCode !== 0) return { veths, ips };
    const doc = JSON.parse(res.stdout) as { nftables?: Array<{ set?: { name: string; elem?: unknown[] } }> };
    for (const item of doc.nftables ?? []) {
      if (!item.set) continue;
      const target = item.set.name === 'slot_veths' ? veths : item.set.name === 'slot_hosts' ? ips : undefined;
      for (const e of item.set.elem ?? []) if (typeof e === 'string') target?.add(e);
    }
    return { veths, ips };
  }

  /** Which of `specs` have a process (other than us) in their namespace: /proc/<pid>/ns/net against the netns inode. */
  inUse(specs: SlotSpec[]): Promise<Set<number>> {
    return namespacesInUse(new Map(specs.map((s) => [s.idx, s.namespace])));
  }

  /** Everything in the agent's namespace and in /run/netns that follows our slot naming. */
  async scan(withUse = true): Promise<HostScan> {
    const { layout } = this.options;
    const namespaces = new Map<number, string>();
    for (const name of await readdir(NETNS_DIR).catch(() => [] as string[])) {
      const idx = layout.indexOfNamespace(name);
      if (idx !== undefined) namespaces.set(idx, name);
    }
    const hostVeths = new Map<number, string>();
    const links = JSON.parse((await runCommand('ip', ['-j', 'link', 'show'])) || '[]') as Array<{ ifname?: string }>;
    for (const link of links) {
      const idx = link.ifname ? layout.indexOfHostVeth(link.ifname) : undefined;
      if (idx !== undefined && link.ifname) hostVeths.set(idx, link.ifname);
    }
    const inUse = withUse ? await namespacesInUse(namespaces) : new Set<number>();
    return { namespaces, hostVeths, inUse };
  }

  close(): void {
    this.netns.close();
  }
}

/** Slots whose namespace is the network namespace of a running process (other than us). */
async function namespacesInUse(namespaces: Map<number, string>): Promise<Set<number>> {
  const inUse = new Set<number>();
  if (!namespaces.size) return inUse;
  const byInode = new Map<number, number>();
  await Promise.all(
    [...namespaces].map(async ([idx, name]) => {
      const st = await stat(`${NETNS_DIR}/${name}`).catch(() => undefined);
      if (st) byInode.set(st.ino, idx);
    }),
  );
  const pids = (await readdir('/proc')).filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid);
  await Promise.all(
    pids.map(async (pid) => {
      const link = await readlink(`/proc/${pid}/ns/net`).catch(() => '');
      const m = /^net:\[(\d+)\]$/.exec(link);
      const idx = m ? byInode.get(Number(m[1])) : undefined;
      if (idx !== undefined) inUse.add(idx);
    }),
  );
  return inUse;
}

function summarize(ids: number[]): string {
  return ids.length <= 8 ? ids.join(',') : `${ids.slice(0, 8).join(',')}… (${ids.length})`;
}
