import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { UffdPeerProcess } from '#native';
import { logLine, ServiceProcess } from '#test-kit';

/** `./sbx uffd-server serve-file`: one handshake, served until the peer goes away, then exit 0. */
describe('uffd-server serve-file', () => {
  const dirs: string[] = [];
  const kills: Array<() => void> = [];
  afterEach(() => {
    for (const k of kills) k();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it.each([4096, 2097152])(
    'serves a memory file with %i-byte pages and exits 0 when the peer leaves',
    async (pageSize) => {
      const dir = mkdtempSync(join(tmpdir(), 'uffd-serve-file-'));
      dirs.push(dir);
      const memfile = join(dir, 'memfile');
      const size = 8 * 1024 * 1024;
      writeFileSync(memfile, randomBytes(size));
      const socket = join(dir, 'uffd.sock');
      const server = await ServiceProcess.start({
        args: ['uffd-server', 'serve-file', '--memfile', memfile, '--socket', socket, '--page-size', String(pageSize)],
        ready: logLine((e) => e['msg'] === 'listening for the uffd handshake'),
      });
      kills.push(() => void server.kill());
      const peer = new UffdPeerProcess([
        '--socket',
        socket,
        '--size',
        String(size),
        '--page-size',
        String(pageSize),
        '--memfd',
      ]);
      kills.push(() => peer.kill());
      await peer.ready();
      expect(await peer.command(`checkrand ${memfile} 3 100 6000`)).toBe('ok');
      expect(await peer.command(`check ${memfile} 0 ${size}`)).toBe('ok');
      await peer.exit();
      expect(await server.exited).toBe(0);
      expect(server.logs.join('\n')).toContain('"state":"peer-gone"');
      expect(existsSync(socket)).toBe(false);
    },
  );

  it('refuses bad flags with exit 2 and names the field', async () => {
    const server = await ServiceProcess.start({
      args: ['uffd-server', 'serve-file', '--socket', '/tmp/x.sock', '--page-size', '8192'],
    });
    expect(await server.exited).toBe(2);
    const err = server.logs.join('\n');
    expect(err).toMatch(/memfile/);
    expect(err).toMatch(/pageSize|page size/);
  });
});
