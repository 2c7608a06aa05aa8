import { TOKEN_HEADER } from './access-token.js';
import { SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER } from './route-target.js';

// RFC 9110 §7.6.1: these describe one connection and are not forwarded (plus what Connection names).
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);
// Ours alone: the guest never sees the token or the routing headers. `expect` was answered here.
const PROXY_ONLY = new Set([TOKEN_HEADER, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, 'expect']);

export interface ForwardOptions {
  /** The sandbox's mask_request_host: the Host the guest sees. */
  maskHost: string | undefined;
  clientAddress: string | undefined;
  /** Keep Connection/Upgrade (a WebSocket handshake goes through as it came). */
  upgrade: boolean;
}

/**
 * The request headers sent to the sandbox, in `rawHeaders` form (name, value, name, value…, case
 * and order kept): hop-by-hop and proxy headers dropped, Host masked, X-Forwarded-* added.
 */
export function forwardRequestHeaders(raw: string[], o: ForwardOptions): string[] {
  const named = connectionTokens(raw);
  const out: string[] = [];
  let host: string | undefined;
  let forwardedFor: string | undefined;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i]!;
    const value = raw[i + 1]!;
    const lower = name.toLowerCase();
    if (lower === 'host') {
      host ??= value;
      continue;
    }
    if (lower === 'x-forwarded-for') {
      forwardedFor = forwardedFor === undefined ? value : `${forwardedFor}, ${value}`;
      continue;
    }
    if (PROXY_ONLY.has(lower)) continue;
    if (o.upgrade && (lower === 'connection' || lower === 'upgrade')) {
      out.push(name, value);
      continue;
    }
    if (HOP_BY_HOP.has(lower) || named.has(lower)) continue;
    out.push(name, value);
  }
  const client = o.clientAddress?.replace(/^::ffff:/, '');
  const chain = [forwardedFor, client].filter(Boolean).join(', ');
  return [
    'Host',
    o.maskHost || host || '',
    ...out,
    ...(chain ? ['X-Forwarded-For', chain] : []),
    ...(host !== undefined ? ['X-Forwarded-Host', host] : []),
    'X-Forwarded-Proto',
    'http',
  ];
}

/** The response headers passed back to the client: hop-by-hop ones dropped (Node frames the body itself). */
export function forwardResponseHeaders(raw: string[]): string[] {
  const named = connectionTokens(raw);
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const lower = raw[i]!.toLowerCase();
    if (HOP_BY_HOP.has(lower) || named.has(lower)) continue;
    out.push(raw[i]!, raw[i + 1]!);
  }
  return out;
}

/** The header names a Connection header lists: hop-by-hop for this message only. */
function connectionTokens(raw: string[]): Set<string> {
  const names = new Set<string>();
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if (raw[i]!.toLowerCase() !== 'connection') continue;
    for (const t of raw[i + 1]!.split(',')) {
      const name = t.trim().toLowerCase();
      if (name && name !== 'close' && name !== 'keep-alive' && name !== 'upgrade') names.add(name);
    }
  }
  return names;
}

/** One header's value from rawHeaders (first occurrence), case-insensitive. */
export function rawHeader(raw: string[], name: string): string | undefined {
  for (let i = 0; i + 1 < raw.length; i += 2) if (raw[i]!.toLowerCase() === name) return raw[i + 1];
  return undefined;
}
