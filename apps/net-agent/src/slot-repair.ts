import { runCommand, startCommand } from './command-runner.js';
import type { SlotSpec } from './slot-layout.js';
import { hostSetElements, namespaceBatch, namespaceRuleset, type SlotRulesConfig } from './slot-scripts.js';

export interface SlotRepairOptions {
  rules: SlotRulesConfig;
  hostTable: string;
}

interface AddressedLink {
  ifname: string;
  addr_info?: Array<{ family?: string; local: string; prefixlen: number }>;
}

/**
 * Puts back what is missing of a slot whose namespace still exists: the veth pair (with its
 * addresses and routes), the tap (a VMM killed with SIGKILL takes the link standing in for it
 * along), the namespace's default route and rules, the host route and host rules. Used on the
 * slots a starting agent adopts and on every slot given back for reuse, so a slot is never
 * handed out, or kept, broken. Returns the pieces it put back (empty when the slot was whole);
 * throws when a piece cannot be put back.
 */
export async function repairSlot(s: SlotSpec, options: SlotRepairOptions): Promise<string[]> {
  const fixed: string[] = [];
  const nsLines: string[] = [];
  const hostLink = await startCommand('ip', ['-j', 'link', 'show', 'dev', s.hostVeth], '');
  if (hostLink.exitCode !== 0) {
    // The namespace side goes with its peer: a new pair, addressed and routed as at creation.
    await runCommand(
      'ip',
      ['-batch', '-'],
      [
        `link add ${s.hostVeth} type veth peer name ${s.nsVeth} netns ${s.namespace}`,
        `addr add ${s.hostVethIp}/31 dev ${s.hostVeth}`,
        `link set ${s.hostVeth} up`,
        `route add ${s.hostIp}/32 via ${s.nsVethIp} dev ${s.hostVeth}`,
        '',
      ].join('\n'),
      s.namespace,
    );
    fixed.push('veth');
  } else {
    const route = await runCommand('ip', ['-j', 'route', 'show', `${s.hostIp}/32`]);
    if ((JSON.parse(route || '[]') as unknown[]).length === 0) {
      await runCommand('ip', ['route', 'replace', `${s.hostIp}/32`, 'via', s.nsVethIp, 'dev', s.hostVeth]);
      fixed.push('host route');
    }
  }

  const links = JSON.parse(
    (await runCommand('ip', ['-n', s.namespace, '-j', 'addr', 'show'], '', s.namespace)) || '[]',
  ) as AddressedLink[];
  const has = (name: string, address: string) =>
    links.some((l) => l.ifname === name && (l.addr_info ?? []).some((a) => a.local === address));
  const wanted = namespaceBatch(s).split('\n');
  const lineFor = (start: string) => wanted.filter((l) => l.startsWith(start));
  if (!has(s.nsVeth, s.nsVethIp)) {
    nsLines.push(...lineFor(`addr add ${s.nsVethIp}`), ...lineFor(`link set ${s.nsVeth} up`));
    fixed.push(`${s.nsVeth} address`);
  }
  if (!links.some((l) => l.ifname === s.tapName)) {
    nsLines.push(
      ...lineFor(`tuntap add dev ${s.tapName}`),
      ...lineFor(`addr add ${s.tapIp}`),
      ...lineFor(`link set ${s.tapName} up`),
    );
    fixed.push(s.tapName);
  } else if (!has(s.tapName, s.tapIp)) {
    nsLines.push(...lineFor(`addr add ${s.tapIp}`), ...lineFor(`link set ${s.tapName} up`));
    fixed.push(`${s.tapName} address`);
  }
  const defaultRoute = await runCommand('ip', ['-n', s.namespace, '-j', 'route', 'show', 'default'], '', s.namespace);
  if ((JSON.parse(defaultRoute || '[]') as unknown[]).length === 0 || nsLines.some((l) => l.includes(s.nsVethIp))) {
    // A new namespace-side veth has no route yet; `replace` is also right when one survived.
    nsLines.push(`route replace default via ${s.hostVethIp} dev ${s.nsVeth}`);
    if (!fixed.includes('veth')) fixed.push('default route');
  }
  if (nsLines.length)
    await runCommand('ip', ['-n', s.namespace, '-batch', '-'], nsLines.join('\n') + '\n', s.namespace);

  const table = options.rules.slotTable;
  const rules = await startCommand('ip', ['netns', 'exec', s.namespace, 'nft', 'list', 'table', 'ip', table], '');
  if (rules.exitCode !== 0) {
    await runCommand(
      'ip',
      ['netns', 'exec', s.namespace, 'nft', '-f', '-'],
      namespaceRuleset(s, options.rules),
      s.namespace,
    );
    fixed.push('namespace rules');
  }

  const host = await startCommand('nft', ['-j', 'list', 'table', 'ip', options.hostTable], '');
  if (host.exitCode === 0) {
    const text = host.stdout;
    const missingVeth = !text.includes(`"${s.hostVeth}"`);
    const missingIp = !text.includes(`"${s.hostIp}"`);
    const add = hostSetElements('add', options.hostTable, missingVeth ? [s.hostVeth] : [], missingIp ? [s.hostIp] : []);
    if (add) {
      await runCommand('nft', ['-f', '-'], add, 'host');
      fixed.push('host rules');
    }
  }
  return fixed;
}
