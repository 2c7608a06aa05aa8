import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import type { Logger } from '#logging';
import { VmmFailure } from './api-error.js';
import { GuestNetns } from './guest-netns.js';

const run = promisify(execFile);

/**
 * The guest's network inside a net-agent slot. Firecracker attaches the guest NIC to the
 * slot's persistent tap; with no guest kernel, the double puts the guest in a namespace of its
 * own instead: the tap is replaced by a veth of the same name and address whose peer `eth0`
 * (the guest's NIC, with the guest address and a default route via the tap address) sits in
 * the guest namespace. Traffic to the guest therefore crosses the slot's real NAT and
 * firewall rules, exactly the path it takes to a Firecracker guest.
 *
 * `close` puts the slot back as it was: the veth goes, and a tap of that name is created
 * again with its recorded address, MTU and owner, so net-agent can hand the slot out again.
 * If the VMM is killed, the namespace dies with it and takes the veth pair along; the next
 * VMM in the slot (or net-agent) finds no `tap0` and creates one.
 */
export interface GuestNetworkOptions {
  tapName: string;
  /** The slot side, e.g. 169.254.0.22/30. */
  tapCidr: string;
  guestAddress: string;
  guestPrefixLength: number;
  logger: Logger;
}

interface TapRecord {
  existed: boolean;
  kind: string | undefined;
  addresses: string[];
  mtu: number | undefined;
  up: boolean;
  user: string | undefined;
  group: string | undefined;
  multiQueue: boolean;
  vnetHdr: boolean;
}

export class GuestNetwork {
  private closed = false;
  private constructor(
    private readonly options: GuestNetworkOptions,
    readonly netns: GuestNetns,
    private readonly tap: TapRecord,
  ) {}

  static async attach(options: GuestNetworkOptions): Promise<GuestNetwork> {
    return GuestNetwork.attachOver(await recordTap(options.tapName), options);
  }

  /** Like attach, but only over a tap that is there now (undefined when there is none). */
  static async attachExisting(options: GuestNetworkOptions): Promise<GuestNetwork | undefined> {
    const tap = await recordTap(options.tapName);
    return tap.existed ? GuestNetwork.attachOver(tap, options) : undefined;
  }

  /** Whether this is the link `options` asks for (same tap, slot side and guest address). */
  matches(options: Omit<GuestNetworkOptions, 'logger'>): boolean {
    const o = this.options;
    return (
      !this.closed &&
      o.tapName === options.tapName &&
      o.tapCidr === options.tapCidr &&
      o.guestAddress === options.guestAddress &&
      o.guestPrefixLength === options.guestPrefixLength
    );
  }

  private static async attachOver(tap: TapRecord, options: GuestNetworkOptions): Promise<GuestNetwork> {
    if (tap.existed && tap.kind !== 'tun' && tap.kind !== 'veth') {
      throw new VmmFailure('TAP_UNEXPECTED', `${options.tapName} is a ${tap.kind ?? 'plain'} link, not a tap`, {
        tap: options.tapName,
      });
    }
    const netns = GuestNetns.create();
    const network = new GuestNetwork(options, netns, tap);
    try {
      await network.plumb();
    } catch (err) {
      await network.close().catch(() => undefined);
      throw err;
    }
    options.logger.info(
      { tap: options.tapName, guest: `${options.guestAddress}/${options.guestPrefixLength}`, replacedTap: tap.existed },
      'guest network attached (veth in place of the tap)',
    );
    return network;
  }

  private async plumb(): Promise<void> {
    const { tapName, tapCidr, guestAddress, guestPrefixLength } = this.options;
    if (this.tap.existed) await ip(['link', 'del', tapName]);
    await ipBatch([`link add ${tapName} type veth peer name eth0 netns ${GuestNetns.CHILD_NETNS_PATH}`], {
      passNetns: this.netns,
    });
    const slotSide = [`addr add ${tapCidr} dev ${tapName}`];
    if (this.tap.mtu) slotSide.push(`link set ${tapName} mtu ${this.tap.mtu}`);
    slotSide.push(`link set ${tapName} up`);
    await ipBatch(slotSide);
    const gateway = tapCidr.split('/')[0] ?? '';
    await ipBatch(
      [
        'link set lo up',
        `addr add ${guestAddress}/${guestPrefixLength} dev eth0`,
        ...(this.tap.mtu ? [`link set eth0 mtu ${this.tap.mtu}`] : []),
        'link set eth0 up',
        `route add default via ${gateway}`,
      ],
      { passNetns: this.netns, enter: true },
    );
  }

  /** Removes the veth pair and the namespace and recreates the tap as it was. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const { tapName, tapCidr } = this.options;
    const errors: unknown[] = [];
    await ip(['link', 'del', tapName]).catch((err: unknown) => {
      if (!String(err).includes('Cannot find device')) errors.push(err);
    });
    this.netns.close();
    try {
      const add = ['tuntap', 'add', 'dev', tapName, 'mode', 'tap'];
      if (this.tap.user) add.push('user', this.tap.user);
      if (this.tap.group) add.push('group', this.tap.group);
      if (this.tap.multiQueue) add.push('multi_queue');
      if (this.tap.vnetHdr) add.push('vnet_hdr');
      await ip(add);
      const addresses = this.tap.existed && this.tap.addresses.length > 0 ? this.tap.addresses : [tapCidr];
      const batch = addresses.map((a) => `addr add ${a} dev ${tapName}`);
      if (this.tap.mtu) batch.push(`link set ${tapName} mtu ${this.tap.mtu}`);
      if (this.tap.up || !this.tap.existed) batch.push(`link set ${tapName} up`);
      await ipBatch(batch);
    } catch (err) {
      errors.push(err);
    }
    if (errors.length > 0) {
      this.options.logger.error({ err: errors[0], tap: tapName }, 'restoring the slot tap failed');
      throw errors[0];
    }
    this.options.logger.info({ tap: tapName }, 'slot tap restored');
  }
}

async function recordTap(name: string): Promise<TapRecord> {
  const record: TapRecord = {
    existed: false,
    kind: undefined,
    addresses: [],
    mtu: undefined,
    up: false,
    user: undefined,
    group: undefined,
    multiQueue: false,
    vnetHdr: false,
  };
  let out: string;
  try {
    out = (await run('ip', ['-d', '-j', 'addr', 'show', 'dev', name])).stdout;
  } catch {
    return record;
  }
  const links = JSON.parse(out) as IpLink[];
  const link = links[0];
  if (!link) return record;
  record.existed = true;
  record.kind = link.linkinfo?.info_kind;
  record.mtu = link.mtu;
  record.up = (link.flags ?? []).includes('UP');
  record.addresses = (link.addr_info ?? [])
    .filter((a) => a.family === 'inet' || (a.family === 'inet6' && a.scope !== 'link'))
    .map((a) => `${a.local}/${a.prefixlen}`);
  const data = link.linkinfo?.info_data;
  if (data) {
    if (data.user !== undefined) record.user = String(data.user);
    if (data.group !== undefined) record.group = String(data.group);
    record.multiQueue = data.multi_queue === true;
    record.vnetHdr = data.vnet_hdr === true;
  }
  return record;
}

interface IpLink {
  mtu?: number;
  flags?: string[];
  linkinfo?: {
    info_kind?: string;
    info_data?: { user?: string | number; group?: string | number; multi_queue?: boolean; vnet_hdr?: boolean };
  };
  addr_info?: { family: string; local: string; prefixlen: number; scope?: string }[];
}

async function ip(args: string[]): Promise<void> {
  try {
    await run('ip', args);
  } catch (err) {
    const stderr = (err as { stderr?: string }).stderr?.trim();
    throw new VmmFailure('IP_COMMAND', `ip ${args.join(' ')} failed: ${stderr || (err as Error).message}`);
  }
}

/**
 * Several `ip` commands in one process. With `passNetns` the guest namespace fd becomes the
 * child's fd 3 (GuestNetns.CHILD_NETNS_PATH); with `enter` the commands run inside it.
 */
async function ipBatch(commands: string[], options: { passNetns?: GuestNetns; enter?: boolean } = {}): Promise<void> {
  const file = options.enter ? 'nsenter' : 'ip';
  const argv = options.enter ? [`--net=${GuestNetns.CHILD_NETNS_PATH}`, 'ip', '-batch', '-'] : ['-batch', '-'];
  const stdio: ('pipe' | number)[] = ['pipe', 'pipe', 'pipe'];
  if (options.passNetns) stdio.push(options.passNetns.fd);
  await new Promise<void>((resolve, reject) => {
    const child = spawn(file, argv, { stdio });
    let stderr = '';
    child.stderr?.on('data', (c: Buffer) => (stderr += c.toString()));
    child.stdout?.resume();
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve();
      else
        reject(
          new VmmFailure('IP_COMMAND', `ip batch [${commands.join('; ')}] failed: ${stderr.trim() || `exit ${code}`}`),
        );
    });
    child.stdin?.end(commands.join('\n') + '\n');
  });
}
