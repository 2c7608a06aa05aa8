/** Messages between the VMM's main thread and its vCPU worker (vcpu-worker.ts). */

/** The first request to a worker is `attach`: the guest memory mapping in this process (address = its start). */
export type VcpuRequest = { id: number } & (
  | { op: 'attach'; address: number; size: number; pageSize: number }
  | { op: 'write'; offset: number; data: Uint8Array }
  | { op: 'fill'; offset: number; length: number; pattern: Uint8Array }
  | { op: 'read'; offset: number; length: number }
  | { op: 'hash'; offset: number; length: number }
  | { op: 'boot'; seed: number }
  | { op: 'dump'; path: string; ranges: [number, number][]; merge: boolean }
  | { op: 'touch' }
  | { op: 'touch-runs'; runs: [number, number][] }
  | { op: 'rewrite'; offset: number }
);

export type VcpuReply = { id: number; ok: true; result: unknown } | { id: number; ok: false; error: string };
