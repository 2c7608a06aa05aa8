import type { NetAgentConfig } from './net-agent-config.js';
import { formatIpv4, parseCidr, parseIpv4 } from './ipv4.js';
import { TypedError } from '#service-kit';

/** Every name and address of one slot, derived from its index (DESIGN §5). */
export interface SlotSpec {
  idx: number;
  namespace: string;
  hostVeth: string;
  nsVeth: string;
  /** Host side of the veth /31 (even address), the namespace's default gateway. */
  hostVethIp: string;
  /** Namespace side of the veth /31 (odd address), the host route's next hop. */
  nsVethIp: string;
  tapName: string;
  tapIp: string;
  tapPrefix: number;
  guestIp: string;
  /** What the node uses to reach the sandbox; DNAT-ed to the guest inside the namespace. */
  hostIp: string;
}

export class SlotIndexInvalid extends TypedError {
  readonly code = 'SLOT_INDEX_INVALID';
  constructor(
    readonly idx: number,
    readonly first: number,
    readonly last: number,
  ) {
    super(`slot index ${idx} is outside ${first}..${last}`);
  }
}

export type SlotLayoutConfig = Pick<
  NetAgentConfig,
  | 'firstSlot'
  | 'slotCount'
  | 'namespacePrefix'
  | 'hostVethPrefix'
  | 'nsVethName'
  | 'tapName'
  | 'tapIp'
  | 'tapPrefix'
  | 'guestIp'
  | 'vethCidr'
  | 'hostCidr'
>;

export class SlotLayout {
  readonly first: number;
  readonly last: number;
  private readonly vethBase: number;
  private readonly hostBase: number;
  private readonly namespacePattern: RegExp;
  private readonly vethPattern: RegExp;

  constructor(private readonly config: SlotLayoutConfig) {
    this.first = config.firstSlot;
    this.last = config.firstSlot + config.slotCount - 1;
    this.vethBase = parseCidr(config.vethCidr).base;
    this.hostBase = parseCidr(config.hostCidr).base;
    this.namespacePattern = new RegExp(`^${escapeRegExp(config.namespacePrefix)}(0|[1-9]\\d{0,9})$`);
    this.vethPattern = new RegExp(`^${escapeRegExp(config.hostVethPrefix)}(0|[1-9]\\d{0,9})$`);
    parseIpv4(config.tapIp);
    parseIpv4(config.guestIp);
  }

  contains(idx: number): boolean {
    return Number.isInteger(idx) && idx >= this.first && idx <= this.last;
  }

  slot(idx: number): SlotSpec {
    if (!this.contains(idx)) throw new SlotIndexInvalid(idx, this.first, this.last);
    return {
      idx,
      namespace: `${this.config.namespacePrefix}${idx}`,
      hostVeth: `${this.config.hostVethPrefix}${idx}`,
      nsVeth: this.config.nsVethName,
      hostVethIp: formatIpv4(this.vethBase + 2 * idx),
      nsVethIp: formatIpv4(this.vethBase + 2 * idx + 1),
      tapName: this.config.tapName,
      tapIp: this.config.tapIp,
      tapPrefix: this.config.tapPrefix,
      guestIp: this.config.guestIp,
      // +1: the first address of the block is its network address.
      hostIp: formatIpv4(this.hostBase + idx + 1),
    };
  }

  /** The slot index a namespace name belongs to, or undefined when it is not one of ours. */
  indexOfNamespace(name: string): number | undefined {
    return this.matchIndex(this.namespacePattern, name);
  }

  indexOfHostVeth(name: string): number | undefined {
    return this.matchIndex(this.vethPattern, name);
  }

  private matchIndex(pattern: RegExp, name: string): number | undefined {
    const m = pattern.exec(name);
    if (!m) return undefined;
    const idx = Number(m[1]);
    return this.contains(idx) ? idx : undefined;
  }
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
