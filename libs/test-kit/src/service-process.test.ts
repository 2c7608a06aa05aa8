import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { acceptsConnections, logLine } from './readiness.js';
import { builtEntry, repoRoot } from './repo-root.js';
import { ServiceProcess } from './service-process.js';

// A stand-in service: logs JSON lines like pino, listens on the socket given, and handles
// SIGTERM as told (exit 0 after cleanup, or ignore it like a hung service).
const fixture = `
const net = require('node:net');
const [socket, onTerm] = process.argv.slice(1);
if (socket === 'fail') { console.error('boom: bad flag'); process.exit(2); }
const server = net.createServer((c) => c.end()).listen(socket, () => {
  console.log(JSON.stringify({ msg: 'serving', socket }));
  process.stdout.write('{"msg":"partial');
  process.stdout.write(' line"}\\n');
});
process.on('SIGTERM', () => {
  if (onTerm === 'ignore') return console.log(JSON.stringify({ msg: 'ignoring SIGTERM' }));
  server.close(() => { console.log(JSON.stringify({ msg: 'stopped cleanly' })); process.exit(0); });
});
`;
const dir = mkdtempSync(join(tmpdir(), 'test-kit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function start(args: string[], extra: Partial<Parameters<typeof ServiceProcess.start>[0]> = {}) {
  return ServiceProcess.start({ name: 'fixture', args, launcher: [process.execPath, '-e', fixture], ...extra });
}

describe('ServiceProcess', () => {
  it('waits for readiness, keeps whole log lines, and stops with SIGTERM', async () => {
    const socket = join(dir, 'a.sock');
    const proc = await start([socket], { ready: acceptsConnections(socket) });
    expect(proc.running).toBe(true);
    await proc.stop();
    expect(await proc.exited).toBe(0);
    expect(proc.findLog((e) => e['msg'] === 'serving')).toEqual({ msg: 'serving', socket });
    expect(proc.logs).toContain('{"msg":"partial line"}');
    expect(proc.logs.at(-1)).toBe('{"msg":"stopped cleanly"}');
  });

  it('kills a service that ignores SIGTERM once the stop bound passes', async () => {
    const socket = join(dir, 'b.sock');
    const proc = await start([socket, 'ignore'], {
      ready: logLine('"msg":"serving"'),
      stopTimeoutMs: 100,
    });
    expect(await proc.stop()).toBeNull();
    expect(proc.running).toBe(false);
    expect(proc.child.signalCode).toBe('SIGKILL');
  });

  it('fails a start whose service exits first, with its logs in the error', async () => {
    await expect(start(['fail'], { ready: acceptsConnections(join(dir, 'never.sock')) })).rejects.toThrow(
      /fixture did not become ready: exited 2 while starting\nboom: bad flag/,
    );
  });

  it('kills a service that is not ready in time', async () => {
    const socket = join(dir, 'c.sock');
    let started: ServiceProcess | undefined;
    const failing = start([socket], {
      ready: async (proc) => {
        started = proc;
        throw new Error('never ready');
      },
    });
    await expect(failing).rejects.toThrow('fixture did not become ready: never ready');
    expect(started?.running).toBe(false);
  });

  it('starts the same service again with restart()', async () => {
    const socket = join(dir, 'd.sock');
    const first = await start([socket], { ready: acceptsConnections(socket) });
    expect(await first.stop()).toBe(0);
    const second = await first.restart();
    expect(second.pid).not.toBe(first.pid);
    expect(await second.stop()).toBe(0);
  });

  it('starts a service that logs JSON once its line is there', async () => {
    const socket = join(dir, 'e.sock');
    const proc = await start([socket], { ready: logLine((e) => e['msg'] === 'serving' && e['socket'] === socket) });
    expect(await proc.stop()).toBe(0);
  });

  it('finds the built entry ./sbx runs for a service, a tool and a CLI command', () => {
    const cli = join(repoRoot, 'dist/tools/sbx/src/main.js');
    if (!existsSync(cli)) return; // nothing built: the service tests say so themselves
    expect(builtEntry('uffd-server')).toBe(join(repoRoot, 'dist/apps/uffd-server/src/main.js'));
    expect(builtEntry('vmm-sim')).toBe(join(repoRoot, 'dist/tools/vmm-sim/src/main.js'));
    expect(builtEntry('node')).toBe(cli);
  });
});
