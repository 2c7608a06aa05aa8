/**
 * The two h2 ends of a client-port test: a guest that answers every stream with
 * `h2 <authority> <path>` (so a test sees which route and path reached it), and a client that
 * sends one GET with prior knowledge and reads the body.
 */
import { connect, createServer, type Http2Server } from 'node:http2';

export function h2Guest(): Http2Server {
  const server = createServer();
  server.on('stream', (stream, headers) => {
    stream.respond({ ':status': 200 });
    stream.end(`h2 ${headers[':authority']} ${headers[':path']}`);
  });
  return server;
}

/** GET `path` from `authority` through the h2c port `port`; resolves to the body. */
export async function h2Get(port: number, authority: string, path: string): Promise<string> {
  const session = connect(`http://127.0.0.1:${port}`);
  try {
    return await new Promise<string>((resolve, reject) => {
      const req = session.request({ ':path': path, ':authority': authority });
      let text = '';
      req.on('data', (d: Buffer) => (text += d));
      req.on('end', () => resolve(text));
      req.on('error', reject);
    });
  } finally {
    session.close();
  }
}
