import { dial, unary } from '#grpc';
import { BlockServerClient, type BlockDevice, type BlockExportResponse } from '#proto/sbx/block';
import { DnsClient } from '#proto/sbx/dns';
import { NetAgentClient, type NetSlot } from '#proto/sbx/net';
import { UffdServerClient, type UffdExportDiffResponse, type UffdPrepareResponse } from '#proto/sbx/uffd';
import type {
  DeviceProvider,
  MemoryProvider,
  MemoryServing,
  NameRegistry,
  NodeServices,
  SlotProvider,
} from './node-services.js';

export interface ControlSockets {
  uffd: string;
  block: string;
  net: string;
  dns: string;
}

/** The real node services: gRPC clients on their control sockets. */
export class GrpcNodeServices implements NodeServices {
  readonly slots: SlotProvider;
  readonly devices: DeviceProvider;
  readonly memory: MemoryProvider;
  readonly names: NameRegistry;
  private readonly clients: { close(): void }[];

  constructor(sockets: ControlSockets, timeoutMs: number) {
    const net = dial(NetAgentClient, sockets.net);
    const block = dial(BlockServerClient, sockets.block);
    const uffd = dial(UffdServerClient, sockets.uffd);
    const dns = dial(DnsClient, sockets.dns);
    this.clients = [net, block, uffd, dns];
    // Exports and prepares may move large files; give them more time than quick lookups.
    const long = timeoutMs * 4;
    this.slots = {
      acquire: (sandboxId) => unary(net, net.acquire, { sandboxId }, timeoutMs),
      release: async (slot: NetSlot, reuse) => {
        await unary(net, net.release, { idx: slot.idx, sandboxId: slot.sandboxId, reuse }, timeoutMs);
      },
      list: async () => (await unary(net, net.list, {}, timeoutMs)).slots,
    };
    this.devices = {
      open: (sandboxId, buildId): Promise<BlockDevice> =>
        unary(block, block.open, { sandboxId, buildId, attachKernel: true }, long),
      export: (sandboxId, newBuildId, diffPath): Promise<BlockExportResponse> =>
        unary(block, block.export, { sandboxId, newBuildId, diffPath }, long),
      close: async (sandboxId) => {
        await unary(block, block.closeDevice, { sandboxId }, timeoutMs);
      },
      list: async () => (await unary(block, block.list, {}, timeoutMs)).devices,
    };
    this.memory = {
      prepare: (sandboxId, socketPath, buildId): Promise<UffdPrepareResponse> =>
        unary(uffd, uffd.prepare, { sandboxId, socketPath, buildId, pageSize: 0, prefetchBytes: 0 }, long),
      stopSourcing: async (sandboxId) => {
        await unary(uffd, uffd.stopSourcing, { sandboxId }, timeoutMs);
      },
      exportDiff: (sandboxId, newBuildId, diffPath, memfilePath): Promise<UffdExportDiffResponse> =>
        unary(uffd, uffd.exportDiff, { sandboxId, newBuildId, diffPath, memfilePath }, long),
      stop: async (sandboxId) => {
        await unary(uffd, uffd.stop, { sandboxId }, timeoutMs);
      },
      list: async (): Promise<MemoryServing[]> =>
        (await unary(uffd, uffd.list, {}, timeoutMs)).sandboxes.map((s) => ({
          sandboxId: s.sandboxId,
          state: s.state,
          error: s.error,
        })),
    };
    this.names = {
      set: async (name, ip) => {
        await unary(dns, dns.set, { name, ip }, timeoutMs);
      },
      remove: async (name, ip) => {
        await unary(dns, dns.remove, { name, ip }, timeoutMs);
      },
      list: async () => (await unary(dns, dns.list, {}, timeoutMs)).records,
    };
  }

  close(): void {
    for (const c of this.clients) c.close();
  }
}
