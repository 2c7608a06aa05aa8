import { status, type ServiceError } from '@grpc/grpc-js';
import { dial, unary } from '#grpc';
import { BlockOpenRequest, BlockServerClient, type BlockDevice, type BlockExportResponse } from '#proto/sbx/block';
import { DnsClient } from '#proto/sbx/dns';
import { NetAgentClient, type NetSlot } from '#proto/sbx/net';
import {
  UffdPrepareRequest,
  UffdServerClient,
  type UffdExportDiffResponse,
  type UffdPrepareResponse,
} from '#proto/sbx/uffd';
import { Placement } from './instance-placement.js';
import type {
  DeviceProvider,
  MemoryProvider,
  MemoryServing,
  NameRegistry,
  NodeServices,
  SlotProvider,
} from './node-services.js';

export interface ControlSockets {
  /** One or more uffd-server instances. */
  uffd: string[];
  /** One or more block-server instances. */
  block: string[];
  net: string;
  dns: string;
}

/** Giving back what the service no longer has (never taken, or already released) is done. */
async function goneIsDone(call: Promise<unknown>): Promise<void> {
  try {
    await call;
  } catch (err) {
    if ((err as Partial<ServiceError>).code !== status.NOT_FOUND) throw err;
  }
}

/**
 * How long a call waits for a block-server, uffd-server or dns that refuses connections: one being
 * restarted (Nomad) is back within this, and the channel's reconnect backoff is at most 1 s.
 */
const RESTART_GRACE_MS = 5_000;

/** Retries a call the instance refused (UNAVAILABLE) until it answers or the grace runs out. */
async function throughRestart<T>(call: () => Promise<T>, graceMs = RESTART_GRACE_MS): Promise<T> {
  const deadline = Date.now() + graceMs;
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if ((err as Partial<ServiceError>).code !== status.UNAVAILABLE || Date.now() >= deadline) throw err;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** The real node services: gRPC clients on their control sockets. */
export class GrpcNodeServices implements NodeServices {
  readonly slots: SlotProvider;
  readonly devices: DeviceProvider;
  readonly memory: MemoryProvider;
  readonly names: NameRegistry;
  readonly blockPlacement: Placement<BlockServerClient>;
  readonly uffdPlacement: Placement<UffdServerClient>;
  private readonly clients: { close(): void }[];

  constructor(sockets: ControlSockets, timeoutMs: number) {
    const net = dial(NetAgentClient, sockets.net);
    const dns = dial(DnsClient, sockets.dns);
    const blocks = new Placement(sockets.block.map((s) => dial(BlockServerClient, s)));
    const uffds = new Placement(sockets.uffd.map((s) => dial(UffdServerClient, s)));
    this.blockPlacement = blocks;
    this.uffdPlacement = uffds;
    this.clients = [net, dns, ...blocks.clients, ...uffds.clients];
    // Exports and prepares may move large files; give them more time than quick lookups.
    const long = timeoutMs * 4;
    this.slots = {
      acquire: (sandboxId, egress, pooled) => unary(net, net.acquire, { sandboxId, egress, pooled }, timeoutMs),
      setEgress: async (slot, egress) => {
        await unary(net, net.setEgress, { idx: slot.idx, sandboxId: slot.sandboxId, egress }, timeoutMs);
      },
      release: async (slot: NetSlot, reuse) => {
        await unary(net, net.release, { idx: slot.idx, sandboxId: slot.sandboxId, reuse }, timeoutMs);
      },
      list: async () => (await unary(net, net.list, {}, timeoutMs)).slots,
    };
    this.devices = {
      open: (sandboxId, buildId): Promise<BlockDevice> => {
        const c = blocks.place(sandboxId);
        return throughRestart(() =>
          unary(c, c.open, BlockOpenRequest.fromPartial({ sandboxId, buildId, attachKernel: true }), long),
        );
      },
      export: (sandboxId, newBuildId, diffPath, how): Promise<BlockExportResponse> => {
        const c = blocks.of(sandboxId);
        const request = {
          sandboxId,
          newBuildId,
          diffPath,
          keepServing: false,
          parentBuildId: '',
          dedup: false,
          ...how,
        };
        return throughRestart(() => unary(c, c.export, request, long));
      },
      close: async (sandboxId) => {
        const c = blocks.of(sandboxId);
        await throughRestart(() => goneIsDone(unary(c, c.closeDevice, { sandboxId }, timeoutMs)));
        blocks.forget(sandboxId);
      },
      list: async () => {
        const all: BlockDevice[] = [];
        for (const [i, c] of blocks.clients.entries()) {
          for (const d of (await unary(c, c.list, {}, timeoutMs)).devices) {
            blocks.learn(d.sandboxId, i);
            all.push(d);
          }
        }
        return all;
      },
    };
    this.memory = {
      prepare: (sandboxId, socketPath, buildId): Promise<UffdPrepareResponse> => {
        const c = uffds.place(sandboxId);
        return throughRestart(() =>
          unary(c, c.prepare, UffdPrepareRequest.fromPartial({ sandboxId, socketPath, buildId }), long),
        );
      },
      stopSourcing: async (sandboxId) => {
        const c = uffds.of(sandboxId);
        await unary(c, c.stopSourcing, { sandboxId }, timeoutMs);
      },
      stopRecording: async (sandboxId) => {
        const c = uffds.of(sandboxId);
        await unary(c, c.stopRecording, { sandboxId }, timeoutMs);
      },
      exportDiff: (request): Promise<UffdExportDiffResponse> => {
        const c = uffds.of(request.sandboxId);
        return unary(c, c.exportDiff, { keepServing: false, dedup: false, prefetchPath: '', ...request }, long);
      },
      stop: async (sandboxId) => {
        const c = uffds.of(sandboxId);
        try {
          await throughRestart(() => goneIsDone(unary(c, c.stop, { sandboxId }, timeoutMs)));
        } finally {
          // An instance that died took the serving with it: nothing is left to count there.
          uffds.forget(sandboxId);
        }
      },
      tracking: async (sandboxId) => {
        const c = uffds.of(sandboxId);
        return (await unary(c, c.stats, { sandboxId }, timeoutMs)).tracking;
      },
      list: async (): Promise<MemoryServing[]> => {
        const all: MemoryServing[] = [];
        for (const [i, c] of uffds.clients.entries()) {
          for (const s of (await unary(c, c.list, {}, timeoutMs)).sandboxes) {
            uffds.learn(s.sandboxId, i);
            all.push({ sandboxId: s.sandboxId, state: s.state, error: s.error });
          }
        }
        return all;
      },
    };
    this.names = {
      set: async (name, ip) => {
        await throughRestart(() => unary(dns, dns.set, { name, ip }, timeoutMs));
      },
      remove: async (name, ip) => {
        await throughRestart(() => unary(dns, dns.remove, { name, ip }, timeoutMs));
      },
      list: async () => (await unary(dns, dns.list, {}, timeoutMs)).records,
    };
  }

  close(): void {
    for (const c of this.clients) c.close();
  }
}
