import { createHash, randomBytes } from 'node:crypto';
import { readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeHeader, NIL_UUID } from '#storage';
import { eventually } from '#test-kit';
import { NodeDriver } from './node-driver.js';
import { missingPieces, NodeUnderTest } from './node-under-test.js';
import { startRedis, type RedisUnderTest } from './redis-server.js';

/*
 * Soak: create → delete cycles of one sandbox through SandboxService, on the whole node (five
 * services + vmm-sim). What every service holds (fds, mappings, memory) and what the node holds
 * (namespaces, links, rules, devices, files, processes) is counted after the first 10 cycles
 * and again at the end: it must not grow. Chaos: sandboxes write checksummed memory and disk
 * while each service in turn is killed with SIGKILL and started again; every acknowledged byte
 * must read back. `npm test` runs short versions; `npm run soak` runs 1,000 cycles
 * (SBX_SOAK_CYCLES), 20 sandboxes (SBX_SOAK_SANDBOXES) and a 100-generation pause → resume
 * chain (SBX_SOAK_GENERATIONS) and prints the figures.
 */

const CYCLES = Number(process.env['SBX_SOAK_CYCLES'] ?? 15);
const SANDBOXES = Number(process.env['SBX_SOAK_SANDBOXES'] ?? 2);
const GENERATIONS = Number(process.env['SBX_SOAK_GENERATIONS'] ?? 5);
/** Low, so that even the short chain crosses it and is compacted again and again. */
const CAP = 3;
const WARM = 10;
const missing = missingPieces();
if (missing) console.warn(`soak suite skipped: missing ${missing}`);

let node: NodeUnderTest;
let redis: RedisUnderTest | undefined;
let reader: Redis;
let d: NodeDriver;

beforeAll(async () => {
  if (missing) return;
  redis = await startRedis({ unixSocket: `/tmp/or-redis-soak-${process.pid}.sock` });
  reader = redis.connect();
  node = await NodeUnderTest.start({ tag: 'k', redisUrl: redis.url, generationCap: CAP });
  d = new NodeDriver(node, reader);
  await d.warmUp();
}, 180_000);

afterAll(async () => {
  await node?.stop();
  reader?.disconnect();
  await redis?.stop();
}, 120_000);

/** Per service process: open fds, mappings and resident memory (KiB). */
async function serviceCounts(): Promise<Record<string, { fds: number; maps: number; rssKiB: number }>> {
  const out: Record<string, { fds: number; maps: number; rssKiB: number }> = {};
  for (const [name, service] of node.services) {
    const pid = service.pid;
    const fds = (await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])).length;
    const maps = (await readFile(`/proc/${pid}/maps`, 'utf8').catch(() => '')).split('\n').filter(Boolean).length;
    const rss = /VmRSS:\s+(\d+)/.exec(await readFile(`/proc/${pid}/status`, 'utf8').catch(() => ''));
    out[name] = { fds, maps, rssKiB: Number(rss?.[1] ?? 0) };
  }
  return out;
}

/** What the node holds: slot namespaces, links, routes, rules, NBD devices, sandbox files, VMMs, processes. */
async function nodeCounts(): Promise<Record<string, number>> {
  const f = await node.footprint();
  let processes = 0;
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    // Everything started for this node names its directory (sockets, data) on its command line.
    if (cmdline.includes(node.root)) processes++;
  }
  const pidOf = node.services.get('orchestrator')?.pid;
  const sockets = pidOf
    ? (
        await Promise.all(
          (await readdir(`/proc/${pidOf}/fd`).catch(() => [] as string[])).map((fd) =>
            readlink(`/proc/${pidOf}/fd/${fd}`).catch(() => ''),
          ),
        )
      ).filter((t) => t.startsWith('socket:')).length
    : 0;
  return {
    namespaces: f['namespaces']!.length,
    links: f['links']!.length,
    routes: f['routes']!.length,
    rules: f['rules']!.length,
    devices: f['devices']!.length,
    uffdServings: f['uffd']!.length,
    dnsRecords: f['dns']!.length,
    sandboxFiles: f['sandboxDirs']!.length + f['sockets']!.length,
    vmms: f['vmmProcesses']!.length,
    processes,
    orchestratorSockets: sockets,
  };
}

describe.skipIf(missing !== undefined)('soak', () => {
  it(`${CYCLES} create → delete cycles leave every count where it was after the first ${WARM}`, async () => {
    let early: { node: Record<string, number>; services: Awaited<ReturnType<typeof serviceCounts>> } | undefined;
    for (let i = 1; i <= CYCLES; i++) {
      const id = `soak-${i}`;
      await d.create(id);
      await d.remove(id);
      if (i === WARM) {
        await d.expectFootprintBack();
        early = { node: await nodeCounts(), services: await serviceCounts() };
      }
    }
    await d.expectFootprintBack();
    const late = { node: await nodeCounts(), services: await serviceCounts() };
    const rows = [
      ...Object.keys(late.node).map((k) => [`node ${k}`, early!.node[k], late.node[k]]),
      ...Object.entries(late.services).flatMap(([name, now]) =>
        (Object.keys(now) as (keyof typeof now)[]).map((k) => [`${name} ${k}`, early!.services[name]?.[k], now[k]]),
      ),
    ];
    console.info(
      `soak: ${CYCLES} cycles; after ${WARM} → at the end\n` +
        rows.map(([what, a, b]) => `  ${String(what).padEnd(32)} ${String(a).padStart(8)} → ${b}`).join('\n'),
    );
    // What must be exactly as it was: the node's resources and every service's fds.
    expect(late.node).toEqual(early!.node);
    // A service may hold an fd for a moment (a control call or a health check in flight, a cache
    // file being closed): the count must come back, a leak never does.
    await eventually(
      async () => {
        const now = await serviceCounts();
        for (const name of Object.keys(late.services))
          expect(now[name]!.fds, `${name} fds`).toBe(early!.services[name]!.fds);
      },
      { timeoutMs: 15_000, intervalMs: 250 },
    );
    // Mappings and memory move with the JavaScript heap: a leak of one per cycle would show as
    // hundreds over a long run, a heap settling shows as a few.
    for (const [name, now] of Object.entries(late.services)) {
      expect(now.maps, `${name} mappings`).toBeLessThan(early!.services[name]!.maps + 64);
      expect(now.rssKiB, `${name} resident memory`).toBeLessThan(early!.services[name]!.rssKiB * 1.5 + 32 * 1024);
    }
  }, 3_600_000);

  it(`${SANDBOXES} sandboxes lose no acknowledged byte while each service in turn is killed with SIGKILL and restarted`, async () => {
    const ids = Array.from({ length: SANDBOXES }, (_, i) => `chaos-${i}`);
    const ips: string[] = [];
    for (const id of ids) ips.push(await d.create(id));
    /** What each sandbox was told and acknowledged: memory and disk chunks with their digests. */
    const written: { ip: string; kind: 'memory' | 'disk'; offset: number; length: number; sha: string }[] = [];
    let round = 0;
    const writeRound = async () => {
      for (const ip of ips) {
        const mem = randomBytes(16 * 1024);
        const disk = randomBytes(64 * 1024);
        const memOffset = 1024 * 1024 + round * mem.length;
        const diskOffset = 1024 * 1024 + round * disk.length;
        await node.writeMemory(ip, memOffset, mem);
        await node.writeDisk(ip, diskOffset, disk);
        const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
        written.push({ ip, kind: 'memory', offset: memOffset, length: mem.length, sha: sha(mem) });
        written.push({ ip, kind: 'disk', offset: diskOffset, length: disk.length, sha: sha(disk) });
      }
      round++;
    };
    let checked = 0;
    const checkAll = async (after: string) => {
      for (const w of written) {
        const back =
          w.kind === 'memory'
            ? await node.readMemory(w.ip, w.offset, w.length)
            : await node.readDisk(w.ip, w.offset, w.length);
        expect(
          createHash('sha256').update(back).digest('hex'),
          `${w.kind} at ${w.offset} of ${w.ip} after ${after}`,
        ).toBe(w.sha);
        checked += w.length;
      }
    };
    await writeRound();
    const kills = ['dns', 'net-agent', 'block-server', 'uffd-server', 'orchestrator'];
    for (const service of kills) {
      await node.restartService(service, 'SIGKILL');
      await checkAll(`${service} SIGKILL`);
      await writeRound();
    }
    await checkAll('every restart');
    expect(await d.listIds()).toEqual(expect.arrayContaining(ids));
    await Promise.all(ids.map((id) => d.remove(id)));
    await d.expectFootprintBack();
    console.info(
      `chaos: ${SANDBOXES} sandboxes, ${kills.length} SIGKILLs (${kills.join(', ')}), ` +
        `${written.length} acknowledged writes, ${checked} bytes checked, 0 lost; nothing left behind`,
    );
  }, 3_600_000);

  it(`a ${GENERATIONS}-generation pause → resume chain reads back byte for byte at every generation, compacted past the cap`, async () => {
    const id = 'chain';
    let ip = await d.create(id);
    // What memory and disk must hold: later writes overwrite earlier ones at the same offsets.
    const memory = new Map<number, Buffer>();
    const disk = new Map<number, Buffer>();
    let checked = 0;
    const verify = async (gen: number) => {
      for (const [offset, data] of memory) {
        expect((await node.readMemory(ip, offset, data.length)).equals(data), `memory at ${offset}, gen ${gen}`).toBe(
          true,
        );
        checked += data.length;
      }
      for (const [offset, data] of disk) {
        expect((await node.readDisk(ip, offset, data.length)).equals(data), `disk at ${offset}, gen ${gen}`).toBe(true);
        checked += data.length;
      }
    };
    for (let gen = 1; gen <= GENERATIONS; gen++) {
      const mem = randomBytes(16 * 1024);
      const blk = randomBytes(32 * 1024);
      const memOffset = 1024 * 1024 + (gen % 16) * mem.length;
      const diskOffset = 1024 * 1024 + (gen % 24) * blk.length;
      await node.writeMemory(ip, memOffset, mem);
      await node.writeDisk(ip, diskOffset, blk);
      memory.set(memOffset, mem);
      disk.set(diskOffset, blk);
      const buildId = crypto.randomUUID();
      await d.pause(id, buildId);
      for (const file of ['memfile.header', 'rootfs.ext4.header']) {
        const header = decodeHeader(await readFile(join(node.cacheDir, 'builds', buildId, file)));
        expect(header.metadata.generation).toBe(gen);
        const layers = new Set(header.mappings.filter((m) => m.buildId !== NIL_UUID).map((m) => m.buildId)).size;
        expect(layers, `${file} layers at gen ${gen}`).toBeLessThanOrEqual(CAP);
      }
      ip = await d.create(id, { snapshot: true, buildId });
      await verify(gen);
    }
    await d.remove(id);
    await d.expectFootprintBack();
    console.info(
      `chain: ${GENERATIONS} generations, ${Math.max(0, GENERATIONS - CAP)} pauses past the cap of ${CAP} ` +
        `(every header at most ${CAP} layers), ${checked} bytes checked byte for byte, 0 differ`,
    );
  }, 3_600_000);
});
