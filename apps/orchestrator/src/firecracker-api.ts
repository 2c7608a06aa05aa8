import { request } from 'node:http';
import { VmmApiError } from './orchestrator-errors.js';

/** The subset of Firecracker's HTTP API the node uses (DESIGN.md §4), over its --api-sock. */
export interface SnapshotLoad {
  snapshotPath: string;
  backend: { type: 'Uffd' | 'File'; path: string };
  enableDiffSnapshots: boolean;
  resumeVm: boolean;
}

export interface SnapshotCreate {
  type: 'Full' | 'Diff';
  snapshotPath: string;
  memFilePath: string;
}

export interface ColdBootSpec {
  kernelImagePath: string;
  bootArgs: string;
  vcpuCount: number;
  memSizeMib: number;
  rootfsPath: string;
  /** Tap device inside the VMM's namespace; none for a VM without network. */
  tapName?: string;
  guestMac?: string;
}

export class FirecrackerApi {
  constructor(
    readonly socketPath: string,
    private readonly timeoutMs = 30_000,
  ) {}

  loadSnapshot(load: SnapshotLoad): Promise<void> {
    return this.call('PUT', '/snapshot/load', {
      snapshot_path: load.snapshotPath,
      mem_backend: { backend_type: load.backend.type, backend_path: load.backend.path },
      enable_diff_snapshots: load.enableDiffSnapshots,
      resume_vm: load.resumeVm,
    }).then(() => undefined);
  }

  setState(state: 'Paused' | 'Resumed'): Promise<void> {
    return this.call('PATCH', '/vm', { state }).then(() => undefined);
  }

  createSnapshot(create: SnapshotCreate): Promise<void> {
    return this.call('PUT', '/snapshot/create', {
      snapshot_type: create.type,
      snapshot_path: create.snapshotPath,
      mem_file_path: create.memFilePath,
    }).then(() => undefined);
  }

  setMmds(metadata: Record<string, unknown>): Promise<void> {
    return this.call('PUT', '/mmds', metadata).then(() => undefined);
  }

  /** `GET /vm/config`'s machine config: after a snapshot load, the restored machine's. */
  async machineConfig(): Promise<{ vcpuCount: number; memSizeMib: number } | undefined> {
    const body = (await this.call('GET', '/vm/config', undefined)) as
      { 'machine-config'?: { vcpu_count?: unknown; mem_size_mib?: unknown } } | undefined;
    const machine = body?.['machine-config'];
    if (typeof machine?.vcpu_count !== 'number' || typeof machine.mem_size_mib !== 'number') return undefined;
    return { vcpuCount: machine.vcpu_count, memSizeMib: machine.mem_size_mib };
  }

  /** Firecracker's `GET /`: instance id, state ("Running", "Paused", "Not started"). */
  async describe(): Promise<{ id?: string; state?: string }> {
    const body = await this.call('GET', '/', undefined);
    return (body ?? {}) as { id?: string; state?: string };
  }

  /** A fresh VM: boot source, machine config, rootfs drive, optional network, InstanceStart. */
  async coldBoot(spec: ColdBootSpec): Promise<void> {
    await this.call('PUT', '/boot-source', { kernel_image_path: spec.kernelImagePath, boot_args: spec.bootArgs });
    await this.call('PUT', '/machine-config', { vcpu_count: spec.vcpuCount, mem_size_mib: spec.memSizeMib });
    await this.call('PUT', '/drives/rootfs', {
      drive_id: 'rootfs',
      path_on_host: spec.rootfsPath,
      is_root_device: true,
      is_read_only: false,
    });
    if (spec.tapName) {
      await this.call('PUT', '/network-interfaces/eth0', {
        iface_id: 'eth0',
        host_dev_name: spec.tapName,
        ...(spec.guestMac ? { guest_mac: spec.guestMac } : {}),
      });
    }
    await this.call('PUT', '/actions', { action_type: 'InstanceStart' });
  }

  private call(method: string, path: string, body: unknown): Promise<unknown> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = request(
        {
          socketPath: this.socketPath,
          method,
          path,
          headers: {
            accept: 'application/json',
            ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
          },
          timeout: this.timeoutMs,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = res.statusCode ?? 0;
            let parsed: unknown;
            try {
              parsed = text ? JSON.parse(text) : undefined;
            } catch {
              parsed = undefined;
            }
            if (status >= 200 && status < 300) return resolve(parsed);
            const fault = (parsed as { fault_message?: string } | undefined)?.fault_message ?? text.slice(0, 500);
            reject(new VmmApiError(method, path, status, fault || 'no fault message'));
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within ${this.timeoutMs} ms`)));
      req.on('error', reject);
      req.end(payload);
    });
  }
}
