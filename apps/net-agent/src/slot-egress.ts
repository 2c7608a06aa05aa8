/**
 * Installs a sandbox's egress policy in its slot: the nft table (one `nft -f` transaction, so the
 * old rules hold until the new ones hold whole; see egress-policy.ts for why that also cuts
 * forwarded connections the new policy forbids) and, for policies with domain rules, the egress
 * proxy's listener in the slot namespace plus a state file, so a restarted agent serves the same
 * policy again (the nft table outlives the agent; the proxy's listener does not).
 */
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '#logging';
import { runCommand } from './command-runner.js';
import {
  egressRuleset,
  parseEgressPolicy,
  usesProxy,
  type EgressPolicy,
  type EgressPolicyInput,
} from './egress-policy.js';
import type { EgressProxy } from './egress-proxy.js';
import type { SlotSpec } from './slot-layout.js';
import { NETNS_DIR } from './slot-network.js';

export const OPEN_POLICY: EgressPolicy = parseEgressPolicy({
  denyInternet: false,
  allowedCidrs: [],
  deniedCidrs: [],
  allowedDomains: [],
});

interface EgressState {
  sandboxId: string;
  egress: EgressPolicyInput;
}

export class SlotEgress {
  constructor(
    private readonly o: {
      proxy: EgressProxy;
      proxyPort: number;
      /** One `<namespace>.json` per slot whose policy uses the proxy. */
      stateDir: string;
      logger: Logger;
    },
  ) {}

  async install(spec: SlotSpec, sandboxId: string, policy: EgressPolicy): Promise<void> {
    if (usesProxy(policy)) {
      // Listener first, then the redirect: no connection is redirected to a closed port.
      const previous = this.o.proxy.policyOf(spec.idx);
      this.o.proxy.set(spec, sandboxId, policy);
      try {
        await this.writeState(spec, { sandboxId, egress: policy.source });
        await this.applyTable(spec, policy);
      } catch (err) {
        // The table still holds the old policy: so does the proxy again (the caller gets the error).
        this.o.proxy.set(spec, sandboxId, previous ?? OPEN_POLICY);
        if (previous && usesProxy(previous)) await this.writeState(spec, { sandboxId, egress: previous.source });
        else await this.removeState(spec);
        throw err;
      }
    } else {
      await this.applyTable(spec, policy);
      this.o.proxy.set(spec, sandboxId, policy);
      await this.removeState(spec);
    }
  }

  /** The slot leaves its sandbox: proxied connections reset, state removed, table cleared when kept. */
  async release(spec: SlotSpec, clearTable: boolean): Promise<void> {
    this.o.proxy.drop(spec.idx);
    await this.removeState(spec);
    if (clearTable) await this.applyTable(spec, OPEN_POLICY);
  }

  /**
   * At start: slots adopted from an earlier run get their proxy back (their nft redirect is still
   * there); state of slots no sandbox holds any more is removed.
   */
  async adopt(slots: Array<{ spec: SlotSpec; sandboxId?: string }>): Promise<number> {
    const byNamespace = new Map(slots.map((s) => [`${s.spec.namespace}.json`, s]));
    const files = await readdir(this.o.stateDir).catch(() => [] as string[]);
    let served = 0;
    for (const file of files) {
      const path = join(this.o.stateDir, file);
      const slot = byNamespace.get(file);
      let state: EgressState;
      let policy: EgressPolicy;
      try {
        state = JSON.parse(await readFile(path, 'utf8')) as EgressState;
        policy = parseEgressPolicy(state.egress);
      } catch (err) {
        this.o.logger.error({ err, file: path }, 'egress state unreadable: removed');
        await rm(path, { force: true });
        continue;
      }
      if (!slot || (slot.sandboxId && slot.sandboxId !== state.sandboxId)) {
        await rm(path, { force: true });
        continue;
      }
      try {
        this.o.proxy.set(slot.spec, state.sandboxId, policy);
        served++;
        this.o.logger.info(
          { sandboxId: state.sandboxId, slot: slot.spec.idx },
          'egress proxy resumed for adopted slot',
        );
      } catch (err) {
        // The redirect stays, so the guest's TCP is refused (fail closed) until a SetEgress or release.
        this.o.logger.error({ err, sandboxId: state.sandboxId, slot: slot.spec.idx }, 'egress proxy not resumed');
      }
    }
    return served;
  }

  private async applyTable(spec: SlotSpec, policy: EgressPolicy): Promise<void> {
    await runCommand(
      'nsenter',
      [`--net=${NETNS_DIR}/${spec.namespace}`, 'nft', '-f', '-'],
      egressRuleset(spec, policy, this.o.proxyPort),
      spec.namespace,
    );
  }

  private async writeState(spec: SlotSpec, state: EgressState): Promise<void> {
    await mkdir(this.o.stateDir, { recursive: true });
    const path = join(this.o.stateDir, `${spec.namespace}.json`);
    await writeFile(`${path}.tmp`, JSON.stringify(state));
    await rename(`${path}.tmp`, path);
  }

  private async removeState(spec: SlotSpec): Promise<void> {
    await rm(join(this.o.stateDir, `${spec.namespace}.json`), { force: true });
  }
}
