import { TOKEN_HEADER } from './access-token.js';
import type { RequestHead } from './http1-head.js';
import { SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER } from './route-target.js';

// RFC 9110 §7.6.1: these describe one connection and are not forwarded (plus what Connection
// names). Content-Length and Transfer-Encoding stay: the body passes through as it was framed.
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'upgrade']);
// Ours alone: the guest never sees the token or the routing headers.
const PROXY_ONLY = new Set([TOKEN_HEADER, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER]);

export interface ForwardOptions {
  /** The sandbox's mask_request_host: the Host the guest sees. */
  maskHost: string | undefined;
  /** The client's address (IPv4-mapped prefix already removed). */
  clientAddress: string | undefined;
  /** Keep Connection/Upgrade and what Connection names (a WebSocket handshake goes as it came). */
  upgrade: boolean;
  /** The client asked to close after this exchange: the sandbox is told so too. */
  close: boolean;
}

/**
 * The request head sent to the sandbox, as text (latin1, so every byte goes through as it
 * came): request line, then the headers in order with duplicates and case kept, hop-by-hop and
 * proxy headers dropped, Host masked, X-Forwarded-* added.
 */
export function forwardRequestHead(head: RequestHead, o: ForwardOptions): string {
  const { names, lower, values } = head;
  const named = o.upgrade ? undefined : head.connection;
  let host: string | undefined;
  let forwardedFor: string | undefined;
  let out = '';
  for (let i = 0; i < names.length; i++) {
    const l = lower[i]!;
    const value = values[i]!;
    if (l === 'host') {
      host ??= value;
      continue;
    }
    if (l === 'x-forwarded-for') {
      forwardedFor = forwardedFor === undefined ? value : `${forwardedFor}, ${value}`;
      continue;
    }
    if (PROXY_ONLY.has(l)) continue;
    if (o.upgrade) {
      if (l !== 'proxy-connection' && l !== 'keep-alive' && l !== 'te' && l !== 'trailer') {
        out += `${names[i]}: ${value}\r\n`;
      }
      continue;
    }
    if (HOP_BY_HOP.has(l) || (named!.length && named!.includes(l))) continue;
    out += `${names[i]}: ${value}\r\n`;
  }
  const chain =
    forwardedFor && o.clientAddress ? `${forwardedFor}, ${o.clientAddress}` : forwardedFor || o.clientAddress;
  let text = `${head.method} ${head.target} HTTP/1.${head.minor}\r\nHost: ${o.maskHost || host || ''}\r\n${out}`;
  if (chain) text += `X-Forwarded-For: ${chain}\r\n`;
  if (host !== undefined) text += `X-Forwarded-Host: ${host}\r\n`;
  text += 'X-Forwarded-Proto: http\r\n';
  if (!o.upgrade) {
    // HTTP/1.0 keeps a connection only when asked; HTTP/1.1 closes only when asked.
    if (o.close) text += 'Connection: close\r\n';
    else if (head.minor === 0) text += 'Connection: keep-alive\r\n';
  }
  return text + '\r\n';
}
