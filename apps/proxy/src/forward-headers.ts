import { TOKEN_HEADER } from './access-token.js';
import { trimOws, type RequestHead } from './http1-head.js';
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
  const { lines, keys } = head;
  // Fields the Connection header names are hop-by-hop too; those are rare, so only then is
  // every name looked at.
  let named: string[] | undefined;
  if (!o.upgrade) {
    for (const t of head.connection) if (t !== 'close' && t !== 'keep-alive') (named ??= []).push(t);
  }
  let host: string | undefined;
  let forwardedFor: string | undefined;
  let out = '';
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    const key = keys[i]!;
    if (key === '') {
      if (named && named.includes(line.slice(0, line.indexOf(':')).toLowerCase())) continue;
      out += line + '\r\n';
      continue;
    }
    if (key === 'host') {
      host ??= value(line);
      continue;
    }
    if (key === 'x-forwarded-for') {
      const v = value(line);
      forwardedFor = forwardedFor === undefined ? v : `${forwardedFor}, ${v}`;
      continue;
    }
    if (PROXY_ONLY.has(key)) continue;
    if (o.upgrade) {
      if (key !== 'proxy-connection' && key !== 'keep-alive' && key !== 'te' && key !== 'trailer') out += line + '\r\n';
      continue;
    }
    if (HOP_BY_HOP.has(key) || named?.includes(key)) continue;
    out += line + '\r\n';
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

function value(line: string): string {
  return trimOws(line, line.indexOf(':') + 1);
}
