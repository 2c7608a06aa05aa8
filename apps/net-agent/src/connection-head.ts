/**
 * The name a connection asks for, from the first bytes its client sends: the SNI of a TLS
 * ClientHello or the Host of an HTTP/1 request. Any other protocol has no name (`none`).
 */
import { looksLikeHttp, parseHttpHost } from './http-host.js';
import { looksLikeTls, parseClientHello, type HeadResult } from './tls-client-hello.js';

export type { HeadResult } from './tls-client-hello.js';

export function parseConnectionHead(head: Uint8Array): HeadResult {
  if (head.length === 0) return { kind: 'more' };
  if (looksLikeTls(head)) return parseClientHello(head);
  if (looksLikeHttp(head)) return parseHttpHost(head);
  return { kind: 'none' };
}
