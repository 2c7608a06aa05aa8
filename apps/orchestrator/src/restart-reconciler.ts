import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { sandboxLogger, type Logger } from '#logging';
import type { EnvdClient } from './envd-client.js';
import type { LifecycleEvents } from './lifecycle-events.js';
import type { NodeServices } from './node-services.js';
import { Sandbox } from './sandbox.js';
import type { SandboxManager } from './sandbox-manager.js';
import type { SandboxStateFile, SandboxStateStore } from './sandbox-state-store.js';
import type { BuildStore } from '#storage';
import type { VmmLauncher } from './vmm-launcher.js';

export interface ReconcileReport {
  adopted: string[];
  cleaned: { sandboxId: string; reason: string }[];
  orphans: string[];
}

export interface ReconcilerOptions {
  manager: SandboxManager;
  services: NodeServices;
  vmm: VmmLauncher;
  envd: EnvdClient;
  /** Builds of adopted sandboxes; staged builds a crashed pause left behind are discarded. */
  builds: BuildStore;
  states: SandboxStateStore;
  events: LifecycleEvents;
  socketDir: string;
  logger: Logger;
  envdTimeoutMs: number;
}

/**
 * On start, finds what a previous run left (state files, VMM processes, slots, devices, uffd
 * servings, DNS records, sockets): a sandbox whose every part is alive and whose envd
 * answers is adopted as it is; everything else is given back. In E2B a restart lost every
 * running sandbox (e2b-dev/infra#2041); here they keep running.
 */
export async function reconcileOnStart(o: ReconcilerOptions): Promise<ReconcileReport> {
  const report: ReconcileReport = { adopted: [], cleaned: [], orphans: [] };
  const [slots, devices, servings, records] = await Promise.all([
    o.services.slots.list().catch(() => []),
    o.services.devices.list().catch(() => []),
    o.services.memory.list().catch(() => []),
    o.services.names.list().catch(() => []),
  ]);
  const adopted = new Set<string>();

  for (const { sandboxId, state } of await o.states.scan()) {
    const log = sandboxLogger(o.logger, sandboxId);
    const why = state ? await adoptable(o, state, { slots, devices, servings }) : 'no state file';
    if (state && why === undefined) {
      try {
        await adopt(o, state, log);
        adopted.add(sandboxId);
        report.adopted.push(sandboxId);
        continue;
      } catch (err) {
        report.cleaned.push({ sandboxId, reason: `adopt failed: ${(err as Error).message}` });
      }
    } else {
      report.cleaned.push({ sandboxId, reason: why ?? 'unknown' });
    }
    log.warn(
      { reason: report.cleaned[report.cleaned.length - 1]?.reason },
      'cleaning up sandbox left by a previous run',
    );
    await cleanUp(o, sandboxId, state);
    await o.events.unpublish(sandboxId);
    await o.events.event('failed', sandboxId, { step: 'restart', error: 'not adoptable after orchestrator restart' });
  }

  // What the services hold for sandboxes no state file knows of. A slot is the sandbox's by
  // index: one that came with a pooled VMM (vmm-pool.ts) keeps the pool's owner name. (A pool
  // slot whose VMM is gone may already have been freed by net-agent itself: acquired `pooled`.)
  const adoptedSlots = new Set([...adopted].map((id) => o.manager.sandboxes.get(id)?.slot?.idx));
  for (const slot of slots) {
    if (slot.sandboxId && !adopted.has(slot.sandboxId) && !adoptedSlots.has(slot.idx)) {
      report.orphans.push(`slot ${slot.idx} (${slot.sandboxId})`);
      await o.services.slots.release(slot, true).catch(() => undefined);
    }
  }
  for (const d of devices) {
    if (!adopted.has(d.sandboxId)) {
      report.orphans.push(`device ${d.sandboxId}`);
      await o.services.devices.close(d.sandboxId).catch(() => undefined);
    }
  }
  for (const s of servings) {
    if (!adopted.has(s.sandboxId)) {
      report.orphans.push(`uffd ${s.sandboxId}`);
      await o.services.memory.stop(s.sandboxId).catch(() => undefined);
    }
  }
  for (const r of records) {
    if (!adopted.has(r.name)) {
      report.orphans.push(`dns ${r.name}`);
      await o.services.names.remove(r.name, r.ip).catch(() => undefined);
    }
  }
  report.orphans.push(...(await killStrayVmms(o.socketDir, o.manager, adopted)));
  const keep = new Set([...adopted].flatMap((id) => [...Object.values(o.manager.socketPaths(id)), apiSocketOf(o, id)]));
  for (const name of await readdir(o.socketDir).catch(() => [] as string[])) {
    const path = join(o.socketDir, name);
    // Directories too: the work dir of a template build the previous run died in (EISDIR made
    // every later start fail, a crash loop under Nomad when the first start raced net-agent).
    if (!keep.has(path)) await rm(path, { force: true, recursive: true });
  }
  await o.builds.discardStaged();
  o.logger.info(report, 'restart reconcile done');
  return report;
}

async function adoptable(
  o: ReconcilerOptions,
  state: SandboxStateFile,
  found: {
    slots: { sandboxId: string; idx: number }[];
    devices: { sandboxId: string }[];
    servings: { sandboxId: string; state: string; error: string }[];
  },
): Promise<string | undefined> {
  if (state.phase !== 'running') return `was ${state.phase} when the orchestrator stopped`;
  if (!state.vmm || !state.slot) return 'incomplete state';
  const slot = state.slot;
  if (!found.slots.some((s) => s.sandboxId === slot.sandboxId && s.idx === slot.idx)) return 'slot gone';
  if (!found.devices.some((d) => d.sandboxId === state.sandboxId)) return 'device gone';
  const serving = found.servings.find((s) => s.sandboxId === state.sandboxId);
  if (!serving) return 'uffd serving gone';
  if (serving.error) return `uffd serving failed: ${serving.error}`;
  if (!(await o.envd.health(state.slot.hostIp))) return 'envd does not answer /health';
  return undefined;
}

async function adopt(o: ReconcilerOptions, state: SandboxStateFile, log: Logger): Promise<void> {
  const vmm = await o.vmm.adopt(state.vmm!, log);
  if (!vmm) throw new Error(`vmm pid ${state.vmm!.pid} is gone`);
  await vmm.api.describe();
  const sbx = new Sandbox({
    id: state.sandboxId,
    config: state.config,
    build: await o.manager.resolveBuild(state.buildId),
    startTime: new Date(state.startTime),
    endTime: new Date(state.endTime),
    dir: o.states.dir(state.sandboxId),
    log,
  });
  const id = sbx.id;
  const { slots, devices, memory, names } = o.services;
  const slot = state.slot!;
  const sockets = o.manager.socketPaths(id);
  sbx.slot = slot;
  sbx.teardown.push('files', () => o.states.remove(id));
  sbx.teardown.push('slot', () => slots.release(slot, true));
  sbx.device = (await devices.list()).find((d) => d.sandboxId === id);
  sbx.teardown.push('device', () => devices.close(id));
  sbx.memorySocket = sockets.uffd;
  sbx.teardown.push('uffd', async () => {
    await memory.stop(id);
    await rm(sockets.uffd, { force: true });
  });
  sbx.vmm = vmm;
  sbx.teardown.push('vmm', async () => {
    await vmm.kill();
    await rm(vmm.apiSocket, { force: true });
  });
  // Its state was written while /init was under way (sandbox-manager.ts, create) and the
  // restart cut the create short: sent again (idempotent) so the guest has its env vars.
  if (!state.envdInitialized) {
    await o.envd.init(slot.hostIp, state.config.envVars ?? {}, o.envdTimeoutMs);
    log.info('envd /init sent again: the create was cut short while it was under way');
  }
  sbx.envdInitialized = true;
  // The record may have been lost with a DNS restart; setting it again is harmless.
  await names.set(id, slot.hostIp);
  sbx.dnsIp = slot.hostIp;
  sbx.teardown.push('dns', () => names.remove(id, slot.hostIp));
  sbx.phase = 'running';
  await o.states.save(sbx.toState());
  o.manager.adopt(sbx);
  await o.events.publish({
    sandboxId: id,
    nodeId: o.manager.settings.nodeId,
    templateId: sbx.config.templateId,
    buildId: sbx.build.buildId,
    hostIp: slot.hostIp,
    guestIp: slot.guestIp,
    startTime: sbx.startTime,
    endTime: sbx.endTime,
  });
  log.info({ pid: vmm.pid }, 'sandbox adopted after restart');
}

/** A pooled VMM's API socket is named after the pool, not the sandbox. */
function apiSocketOf(o: ReconcilerOptions, sandboxId: string): string {
  return o.manager.sandboxes.get(sandboxId)?.vmm?.apiSocket ?? o.manager.socketPaths(sandboxId).api;
}

async function cleanUp(o: ReconcilerOptions, sandboxId: string, state: SandboxStateFile | undefined): Promise<void> {
  const { slots, devices, memory, names } = o.services;
  if (state?.vmm) {
    const vmm = await o.vmm.adopt(state.vmm, sandboxLogger(o.logger, sandboxId)).catch(() => undefined);
    await vmm?.kill();
  }
  if (state?.dnsIp) await names.remove(sandboxId, state.dnsIp).catch(() => undefined);
  await memory.stop(sandboxId).catch(() => undefined);
  await devices.close(sandboxId).catch(() => undefined);
  if (state?.slot) await slots.release(state.slot, true).catch(() => undefined);
  const sockets = o.manager.socketPaths(sandboxId);
  await rm(sockets.api, { force: true });
  if (state?.vmm?.apiSocket) await rm(state.vmm.apiSocket, { force: true });
  await rm(sockets.uffd, { force: true });
  await o.states.remove(sandboxId);
}

/** VMM processes serving an API socket in our socket dir that no adopted sandbox owns. */
async function killStrayVmms(socketDir: string, manager: SandboxManager, adopted: Set<string>): Promise<string[]> {
  const owned = new Set(
    [...adopted].map((id) => manager.sandboxes.get(id)?.vmm?.apiSocket ?? manager.socketPaths(id).api),
  );
  const killed: string[] = [];
  for (const entry of await readdir('/proc').catch(() => [] as string[])) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    const i = argv.indexOf('--api-sock');
    const sock = i >= 0 ? argv[i + 1] : undefined;
    if (!sock || !sock.startsWith(socketDir + '/') || owned.has(sock)) continue;
    try {
      process.kill(pid, 'SIGKILL');
      killed.push(`vmm pid ${pid} (${sock})`);
    } catch {
      // Gone meanwhile.
    }
  }
  return killed;
}
