// Servers a sandbox's guest runs for the proxy tests, started inside the guest's network
// namespace (the VMM double's guest network): HTTP/1.1 on one port, h2c on another.
//   GET  /info             → JSON: method, url, httpVersion, headers as received
//   GET  /download?bytes=N → N bytes of the deterministic pattern (patternByte below), streamed
//   POST /upload           → JSON: { bytes, sha256 } of the body
//   GET  /drip?ms=T&bytes=N→ N bytes of the pattern, 64 KiB every T ms (a long response in flight)
// argv: <http1 port> <h2c port>. Prints "ready" when both listen.
import { createHash } from 'node:crypto';
import { createServer } from 'node:http';
import { createServer as createH2Server } from 'node:http2';

const CHUNK = 64 * 1024;

/** Byte i of every download: the same function the test uses to check what arrived. */
function pattern(offset, length) {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) {
    const n = offset + i;
    out[i] = (n * 131 + (n >>> 8) * 7 + (n >>> 16)) & 0xff;
  }
  return out;
}

function handle(method, url, headers, httpVersion, req, res) {
  const u = new URL(url, 'http://guest');
  if (u.pathname === '/info') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ method, url, httpVersion, headers }));
    return;
  }
  if (u.pathname === '/download' || u.pathname === '/drip') {
    const total = Number(u.searchParams.get('bytes') ?? 0);
    const every = Number(u.searchParams.get('ms') ?? 0);
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(total) });
    let sent = 0;
    const more = () => {
      while (sent < total) {
        const n = Math.min(CHUNK, total - sent);
        const ok = res.write(pattern(sent, n));
        sent += n;
        if (every > 0 && sent < total) return void setTimeout(more, every);
        if (!ok) return void res.once('drain', more);
      }
      res.end();
    };
    res.on('close', () => (sent = total));
    more();
    return;
  }
  if (u.pathname === '/upload') {
    const hash = createHash('sha256');
    let bytes = 0;
    req.on('data', (d) => {
      bytes += d.length;
      hash.update(d);
    });
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ bytes, sha256: hash.digest('hex') }));
    });
    return;
  }
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('no such path\n');
}

const [http1Port, h2Port] = process.argv.slice(2).map(Number);
const http1 = createServer((req, res) => handle(req.method, req.url, req.headers, req.httpVersion, req, res));
const h2 = createH2Server();
h2.on('request', (req, res) => handle(req.method, req.url, req.headers, req.httpVersion, req, res));
let listening = 0;
const ready = () => {
  if (++listening === 2) console.log('ready');
};
http1.listen(http1Port, '0.0.0.0', ready);
h2.listen(h2Port, '0.0.0.0', ready);
process.on('SIGTERM', () => process.exit(0));
