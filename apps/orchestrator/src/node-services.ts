import type { BlockDevice, BlockExportResponse } from '#proto/sbx/block';
import type { NetEgressPolicy, NetSlot } from '#proto/sbx/net';
import type { UffdExportDiffResponse, UffdPrepareResponse } from '#proto/sbx/uffd';

/**
 * The four node services the orchestrator drives, each behind the small interface the
 * sandbox flows need. The real implementations are gRPC clients on the services' control
 * sockets (grpc-node-services.ts); tests substitute one failing step while the rest stay real.
 */

/** net-agent: network slots. */
/** What an ExportDiff of one sandbox's memory writes and from where. */
export interface MemoryDiffExport {
  sandboxId: string;
  newBuildId: string;
  diffPath: string;
  memfilePath: string;
  /** memfilePath is Firecracker's Diff snapshot: its pages are the written ones (KVM's dirty log). */
  vmmDirtyLog: boolean;
  /** A checkpoint's export: no StopSourcing before it, the sandbox is served on. */
  keepServing?: boolean;
  /** Leave pages equal to the served build's to it (only when that build is the new one's parent). */
  dedup?: boolean;
  /** Where the uffd-server writes the recorded prefetch set (the staged build's memfile.prefetch). */
  prefetchPath?: string;
}

export interface SlotProvider {
  /**
   * egress: the sandbox's policy, in force before the slot is handed out. pooled: for a VMM
   * started ahead (vmm-pool.ts); net-agent frees such a slot by itself once its VMM is gone.
   */
  acquire(sandboxId: string, egress?: NetEgressPolicy, pooled?: boolean): Promise<NetSlot>;
  /** Replaces a held slot's egress policy at once (undefined = open); cuts what it now forbids. */
  setEgress(slot: NetSlot, egress: NetEgressPolicy | undefined): Promise<void>;
  release(slot: NetSlot, reuse: boolean): Promise<void>;
  list(): Promise<NetSlot[]>;
}

/** How a rootfs export is made: over which parent, deduplicated or not, and whether the device serves on. */
export interface DiskDiffExport {
  /** A checkpoint's export: the device serves on (else it is finished). */
  keepServing?: boolean;
  /** The build the diff's mappings are merged over (the sandbox's current build). */
  parentBuildId: string;
  /** Leave blocks equal to the parent's to it (`--pause-dedup`). */
  dedup: boolean;
}

/** block-server: copy-on-write rootfs devices served over NBD. */
export interface DeviceProvider {
  open(sandboxId: string, buildId: string): Promise<BlockDevice>;
  export(sandboxId: string, newBuildId: string, diffPath: string, how?: DiskDiffExport): Promise<BlockExportResponse>;
  close(sandboxId: string): Promise<void>;
  list(): Promise<BlockDevice[]>;
}

/** One sandbox as the uffd-server reports it. */
export interface MemoryServing {
  sandboxId: string;
  state: string;
  error: string;
}

/** uffd-server: guest memory served from the memfile layers. */
export interface MemoryProvider {
  prepare(sandboxId: string, socketPath: string, buildId: string): Promise<UffdPrepareResponse>;
  stopSourcing(sandboxId: string): Promise<void>;
  /** The sandbox started (envd answered): its start's faults are recorded (recorded prefetch). */
  stopRecording(sandboxId: string): Promise<void>;
  exportDiff(request: MemoryDiffExport): Promise<UffdExportDiffResponse>;
  stop(sandboxId: string): Promise<void>;
  list(): Promise<MemoryServing[]>;
  /** How written pages are known: 'wp-async' / 'wp-sync' (exactly) or 'present' (every page served). */
  tracking(sandboxId: string): Promise<string>;
}

/** dns: sandbox name → host IP. */
export interface NameRegistry {
  set(sandboxId: string, ip: string): Promise<void>;
  /** Removes the record only if it still points at `ip`. */
  remove(sandboxId: string, ip: string): Promise<void>;
  list(): Promise<{ name: string; ip: string }[]>;
}

export interface NodeServices {
  slots: SlotProvider;
  devices: DeviceProvider;
  memory: MemoryProvider;
  names: NameRegistry;
}
