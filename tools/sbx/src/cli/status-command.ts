import { readdir, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { dial, unary } from '#grpc';
import { SandboxServiceClient } from '#proto/orchestrator';
import { AdmissionClient } from '#proto/sbx/admission';
import { BlockServerClient } from '#proto/sbx/block';
import { NetAgentClient } from '#proto/sbx/net';
import { UffdServerClient } from '#proto/sbx/uffd';
import { defaultDataDir, readNodeRecord } from './node-target.js';
import { printObject } from './output-format.js';

const usage = `usage: ./sbx status [--data-dir <dir>] [--interval-ms 1000] [--json]

The local node at a glance: sandboxes and the admission limits (starting at once, running),
network slots free and used, build cache use, and page-fault and NBD request rates (sampled
over --interval-ms).`;

interface Sample {
  at: number;
  faults: number;
  bytesServed: number;
  nbdReads: number;
  nbdWrites: number;
  devices: number;
  servedSandboxes: number;
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      'data-dir': { type: 'string' },
      'interval-ms': { type: 'string', default: '1000' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(usage);
    return 0;
  }
  const dataDir = resolve(values['data-dir'] ?? defaultDataDir());
  const record = await readNodeRecord(dataDir);
  const socket = (name: string) => {
    const path = record.sockets[name];
    if (!path) throw new Error(`node record ${dataDir}/node.json names no ${name} socket`);
    return path;
  };
  const orchestrator = dial(SandboxServiceClient, socket('orchestrator'));
  const admission = dial(AdmissionClient, socket('orchestrator'));
  const net = dial(NetAgentClient, socket('net-agent'));
  const uffd = dial(UffdServerClient, socket('uffd-server'));
  const block = dial(BlockServerClient, socket('block-server'));
  try {
    const sample = async (): Promise<Sample> => {
      const memory = await unary(uffd, uffd.list, {});
      const devices = await unary(block, block.list, {});
      const stats = await Promise.all(
        devices.devices.map((d) => unary(block, block.stats, { sandboxId: d.sandboxId }).catch(() => undefined)),
      );
      return {
        at: performance.now(),
        faults: memory.sandboxes.reduce((n, s) => n + s.faults, 0),
        bytesServed: memory.sandboxes.reduce((n, s) => n + s.bytesServed, 0),
        servedSandboxes: memory.sandboxes.length,
        nbdReads: stats.reduce((n, s) => n + (s?.reads ?? 0), 0),
        nbdWrites: stats.reduce((n, s) => n + (s?.writes ?? 0), 0),
        devices: devices.devices.length,
      };
    };
    const first = await sample();
    await new Promise((r) => setTimeout(r, Number(values['interval-ms'])));
    const [second, sandboxes, slots, builds, cacheBytes, limits] = await Promise.all([
      sample(),
      unary(orchestrator, orchestrator.list, {}),
      unary(net, net.stats, {}),
      unary(orchestrator, orchestrator.listCachedBuilds, {}),
      diskUsage(join(dataDir, 'cache')),
      unary(admission, admission.status, {}),
    ]);
    const seconds = (second.at - first.at) / 1000;
    const rate = (a: number, b: number) => Math.max(0, (b - a) / seconds);
    printObject(
      {
        sandboxes: sandboxes.sandboxes.length,
        sandboxesLimit: limits.maxSandboxes,
        starting: limits.starting,
        startingLimit: limits.maxStarting,
        waitingToStart: limits.waitingToStart,
        resumeWaitMs: limits.startWaitMs,
        runningVcpus: limits.runningVcpus,
        runningRamMb: limits.runningRamMb,
        slotsReady: slots.readyNew + slots.readyReused,
        slotsInUse: slots.inUse,
        vmmPoolWaiting: limits.vmmPoolWaiting,
        vmmPoolSize: limits.vmmPoolSize,
        slotReservation: slots.reservation,
        cachedBuilds: builds.builds.length,
        cacheMiB: Math.round(cacheBytes / 2 ** 20),
        memorySandboxes: second.servedSandboxes,
        faultsPerSecond: Math.round(rate(first.faults, second.faults)),
        memoryMiBPerSecond: Number((rate(first.bytesServed, second.bytesServed) / 2 ** 20).toFixed(1)),
        nbdDevices: second.devices,
        nbdReadsPerSecond: Math.round(rate(first.nbdReads, second.nbdReads)),
        nbdWritesPerSecond: Math.round(rate(first.nbdWrites, second.nbdWrites)),
      },
      values.json,
    );
    return 0;
  } finally {
    for (const c of [orchestrator, admission, net, uffd, block]) c.close();
  }
}

/** Bytes allocated on disk under a directory (sparse cache files count what they hold). */
async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  const entries = await readdir(dir, { withFileTypes: true, recursive: true }).catch(() => []);
  for (const entry of entries) {
    if (!entry.isFile()) continue;
    const info = await stat(join(entry.parentPath, entry.name)).catch(() => undefined);
    if (info) total += info.blocks * 512;
  }
  return total;
}
