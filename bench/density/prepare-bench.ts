/**
 * uffd-server's Prepare alone (issue 17: the create path's "prepare uffd" step): a
 * `./sbx uffd-server serve` child with a local two-layer build of 128 MiB (a base build and a
 * child build whose header maps a diff over it, as a paused sandbox's build), Prepare + Stop
 * timed from the gRPC client, in two cases: the first sandbox of the build (nothing of it
 * mapped yet) and with 10 other sandboxes of the build already prepared. An empty round trip
 * (List with no sandbox) is timed next to it: the floor of any call.
 *
 *   bash bench/density/prepare.sh [--rounds 60] [--memory-mb 128] [--cpu-prof <dir>]
 *
 * Goal (issue 17): prepare p50 ≤ 4 ms.
 */
import { randomUUID } from 'node:crypto';
import {
  closeSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { dial, unary } from '#grpc';
import { UffdServerClient } from '#proto/sbx/uffd';
import { encodeHeader } from '#storage';
import { grpcServing, repoRoot, ServiceProcess } from '#test-kit';

const PAGE = 4096;

/** CPU time the process used so far, ms (utime + stime, /proc/pid/stat, 1/100 s ticks). */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) * 10;
}

function pct(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      rounds: { type: 'string', default: '60' },
      'memory-mb': { type: 'string', default: '128' },
      'cpu-prof': { type: 'string' },
    },
  });
  const rounds = Number(values.rounds);
  const size = Number(values['memory-mb']) * 1024 * 1024;
  if (!(rounds >= 1 && size > 0)) throw new Error('--rounds ≥ 1, --memory-mb > 0');
  const dir = mkdtempSync(join(tmpdir(), 'prepare-bench-'));
  const cacheDir = join(dir, 'cache');
  const base = randomUUID();
  const child = randomUUID();
  for (const id of [base, child]) mkdirSync(join(cacheDir, 'builds', id), { recursive: true });
  // The base's memory: some data, the rest a hole (reads as zeros); the child's diff: 1 MiB.
  const fd = openSync(join(cacheDir, 'builds', base, 'memfile'), 'w');
  writeSync(fd, Buffer.alloc(4 << 20, 7));
  ftruncateSync(fd, size);
  closeSync(fd);
  writeFileSync(join(cacheDir, 'builds', base, 'snapfile'), '');
  writeFileSync(join(cacheDir, 'builds', child, 'memfile'), Buffer.alloc(1 << 20, 9));
  writeFileSync(join(cacheDir, 'builds', child, 'snapfile'), '');
  writeFileSync(
    join(cacheDir, 'builds', child, 'memfile.header'),
    encodeHeader({
      metadata: { version: 3, blockSize: PAGE, size, generation: 1, buildId: child, baseBuildId: base },
      mappings: [
        { offset: 0, length: 1 << 20, buildId: child, buildStorageOffset: 0 },
        { offset: 1 << 20, length: size - (1 << 20), buildId: base, buildStorageOffset: 1 << 20 },
      ],
    }),
  );
  const controlSocket = join(dir, 'ctl.sock');
  const load = () => execFileSync('uptime').toString().trim();
  console.log(
    `uffd prepare bench: ${rounds} rounds, ${values['memory-mb']} MiB two-layer local build. Load: ${load()}`,
  );
  // --cpu-prof <dir>: the server runs under `node --cpu-prof` (written there when it stops).
  const profDir = values['cpu-prof'];
  const server = await ServiceProcess.start({
    ...(profDir
      ? {
          launcher: [
            process.execPath,
            '--cpu-prof',
            '--cpu-prof-dir',
            profDir,
            join(repoRoot, 'dist', 'tools', 'sbx', 'src', 'main.js'),
          ],
        }
      : {}),
    args: ['uffd-server', 'serve', '--control-socket', controlSocket, '--cache-dir', cacheDir, '--metrics-port', '0'],
    ready: grpcServing(controlSocket),
  });
  const client = dial(UffdServerClient, controlSocket);
  let failed = false;
  try {
    const prepare = (sandboxId: string) =>
      unary(client, client.prepare, {
        sandboxId,
        socketPath: join(dir, `${sandboxId}.sock`),
        buildId: child,
        memfilePath: '',
        pageSize: 0,
        prefetchBytes: 0,
      });
    const stop = (sandboxId: string) => unary(client, client.stop, { sandboxId });
    // Wall time swings with the machine's load; the server's own CPU time per Prepare + Stop does not.
    const cpu: Record<string, number> = {};
    const timed = async (label: string) => {
      const ms: number[] = [];
      const cpu0 = cpuMs(server.pid);
      for (let i = 0; i < rounds; i++) {
        const t = performance.now();
        await prepare(`${label}-${i}`);
        ms.push(performance.now() - t);
        await stop(`${label}-${i}`);
      }
      cpu[label] = (cpuMs(server.pid) - cpu0) / rounds;
      return ms;
    };
    const empty: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const t = performance.now();
      await unary(client, client.list, {});
      empty.push(performance.now() - t);
    }
    // Warm-up (JIT, the store's first look at the build), not counted.
    for (let i = 0; i < 5; i++) {
      await prepare(`warm-${i}`);
      await stop(`warm-${i}`);
    }
    const first = await timed('first');
    const others = Array.from({ length: 10 }, (_, i) => `other-${i}`);
    for (const id of others) await prepare(id);
    const withOthers = await timed('shared');
    for (const id of others) await stop(id);
    const line = (name: string, ms: number[], cpuPerRound?: number) =>
      console.log(
        `  ${name.padEnd(38)} p50 ${pct(ms, 50).toFixed(2).padStart(6)} ms  p99 ${pct(ms, 99).toFixed(2).padStart(6)} ms` +
          (cpuPerRound !== undefined ? `  server CPU per prepare + stop ${cpuPerRound.toFixed(2)} ms` : ''),
      );
    line('empty round trip (List)', empty);
    line('prepare, first sandbox of the build', first, cpu['first']);
    line('prepare, 10 others of the build held', withOthers, cpu['shared']);
    const p50 = Math.max(pct(first, 50), pct(withOthers, 50));
    console.log(`goal: prepare p50 ≤ 4 ms (worst case p50 ${p50.toFixed(2)}): ${p50 <= 4 ? 'met' : 'NOT met'}`);
    console.log(`load after: ${load()}`);
  } catch (err) {
    failed = true;
    console.error(err);
    console.error(server.logs.slice(-20).join('\n'));
  } finally {
    client.close();
    const code = await server.stop();
    if (code !== 0) failed = true;
    rmSync(dir, { recursive: true, force: true });
  }
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);
