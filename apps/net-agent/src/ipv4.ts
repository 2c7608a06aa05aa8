import { TypedError } from '#service-kit';
/** IPv4 addresses as unsigned 32-bit numbers, and CIDR blocks: parsing is strict, a bad value is an error. */

export class Ipv4Invalid extends TypedError {
  readonly code = 'IPV4_INVALID';
  constructor(readonly value: string) {
    super(`not an IPv4 address or CIDR block: ${JSON.stringify(value)}`);
    this.name = 'Ipv4Invalid';
  }
}

export interface Cidr {
  /** Network address (host bits zero). */
  base: number;
  prefix: number;
}

const OCTET = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;

export function parseIpv4(value: string): number {
  const parts = value.split('.');
  if (parts.length !== 4) throw new Ipv4Invalid(value);
  let out = 0;
  for (const part of parts) {
    if (!OCTET.test(part)) throw new Ipv4Invalid(value);
    out = out * 256 + Number(part);
  }
  return out;
}

export function formatIpv4(value: number): string {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new Ipv4Invalid(String(value));
  return [value >>> 24, (value >>> 16) & 255, (value >>> 8) & 255, value & 255].join('.');
}

/** `a.b.c.d/n`; a bare address is a /32. Host bits must be zero so a typo cannot widen a range silently. */
export function parseCidr(value: string): Cidr {
  const slash = value.indexOf('/');
  const address = slash < 0 ? value : value.slice(0, slash);
  const prefixText = slash < 0 ? '32' : value.slice(slash + 1);
  if (!/^(3[0-2]|[12]?\d)$/.test(prefixText)) throw new Ipv4Invalid(value);
  const prefix = Number(prefixText);
  const base = parseIpv4(address);
  if (base % blockSize(prefix) !== 0) throw new Ipv4Invalid(value);
  return { base, prefix };
}

export function formatCidr(cidr: Cidr): string {
  return `${formatIpv4(cidr.base)}/${cidr.prefix}`;
}

export function blockSize(prefix: number): number {
  return 2 ** (32 - prefix);
}

export function cidrContains(cidr: Cidr, address: number): boolean {
  return address >= cidr.base && address < cidr.base + blockSize(cidr.prefix);
}

export function cidrsOverlap(a: Cidr, b: Cidr): boolean {
  return a.base < b.base + blockSize(b.prefix) && b.base < a.base + blockSize(a.prefix);
}
