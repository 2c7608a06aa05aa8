import { constants as fsConstants } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import {
  ApiFault,
  LOAD_NOT_ALLOWED,
  MISSING_KERNEL,
  POST_BOOT_UNSUPPORTED,
  PRE_BOOT_UNSUPPORTED,
  SNAPSHOT_WHILE_RUNNING,
  badRequest,
  osErrorText,
} from './api-error.js';
import type { BootSourceConfig, DriveConfig, MachineConfig, NetworkInterfaceConfig, VmmAction } from './api-request.js';
import { applyMergePatch } from './json-merge-patch.js';
import { Microvm, type MicrovmSettings } from './microvm.js';

export const VMM_VERSION = '1.16.1';
/** Firecracker's default MMDS data store limit (`--mmds-size-limit`, the API payload limit). */
const MMDS_LIMIT_BYTES = 51_200;

export interface ActionResult {
  status: 200 | 204;
  body?: unknown;
}

/**
 * Firecracker's two controllers (rpc_interface.rs) in one: before boot it collects
 * configuration and accepts either InstanceStart or a snapshot load; after, it runs the VM
 * (pause, resume, snapshot create, MMDS). What each state refuses, and the words it uses,
 * are Firecracker's.
 */
export class VmmController {
  private machine: MachineConfig = {
    vcpuCount: 1,
    memSizeMib: 128,
    smt: false,
    trackDirtyPages: false,
    hugePages: 'None',
  };
  private bootSource: BootSourceConfig | undefined;
  private readonly drives = new Map<string, DriveConfig>();
  private readonly nics = new Map<string, NetworkInterfaceConfig>();
  /** Set by any boot-specific configuration: a snapshot load is refused from then on. */
  private bootPath = false;
  private mmds: unknown = undefined;
  /** As configured, for GET /vm/config (the double has no logger, metrics file or MMDS network stack). */
  private loggerConfig: Record<string, unknown> | null = null;
  private metricsConfig: Record<string, unknown> | null = null;
  private mmdsConfig: Record<string, unknown> | null = null;
  private vm: Microvm | undefined;
  /** Aborted by shutdown: a load still waiting on guest memory gives everything back. */
  private readonly stopping = new AbortController();

  constructor(
    private readonly settings: MicrovmSettings,
    private readonly instanceId: string,
  ) {}

  get microvm(): Microvm | undefined {
    return this.vm;
  }

  private get stateName(): 'Not started' | 'Running' | 'Paused' {
    return this.vm ? this.vm.state : 'Not started';
  }

  async handle(action: VmmAction): Promise<ActionResult> {
    switch (action.kind) {
      case 'GetInstanceInfo':
        return ok({ app_name: 'Firecracker', id: this.instanceId, state: this.stateName, vmm_version: VMM_VERSION });
      case 'GetVersion':
        return ok({ firecracker_version: VMM_VERSION });
      case 'GetMachineConfig':
        return ok(machineJson(this.vm ? this.machineOfVm(this.vm) : this.machine));
      case 'GetFullVmConfig':
        return ok(this.fullConfig());
      case 'GetMmds':
        return ok(this.mmds === undefined || this.mmds === null ? {} : this.mmds);
      case 'PutMmds':
        this.setMmds(action.value);
        return empty();
      case 'PatchMmds':
        if (this.mmds === undefined) throw badRequest('MMDS error: The MMDS data store is not initialized.');
        this.setMmds(applyMergePatch(this.mmds, action.value));
        return empty();
    }
    if (this.vm) return this.handleRuntime(this.vm, action);
    return this.handlePreboot(action);
  }

  private setMmds(value: unknown): void {
    if (JSON.stringify(value).length > MMDS_LIMIT_BYTES) {
      throw new ApiFault(413, "MMDS limit exceeded error: The MMDS patch request doesn't fit.");
    }
    this.mmds = value;
    if (this.vm) this.vm.mmdsValue = value;
  }

  private async handlePreboot(action: VmmAction): Promise<ActionResult> {
    switch (action.kind) {
      case 'ConfigureBootSource': {
        this.bootPath = true;
        try {
          await access(action.config.kernelImagePath, fsConstants.R_OK);
        } catch (err) {
          throw badRequest(`Boot source error: The kernel file cannot be opened: ${osErrorText(err)}`);
        }
        this.bootSource = action.config;
        return empty();
      }
      case 'PutMachineConfig':
        this.bootPath = true;
        this.machine = validMachine(action.config);
        return empty();
      case 'PatchMachineConfig':
        this.bootPath = true;
        this.machine = validMachine({ ...this.machine, ...action.update });
        return empty();
      case 'InsertBlockDevice': {
        this.bootPath = true;
        const config = action.config;
        if (config.isRootDevice) {
          for (const d of this.drives.values()) {
            if (d.isRootDevice && d.driveId !== config.driveId)
              throw badRequest('Drive config error: A root block device already exists!');
          }
        }
        try {
          await stat(config.pathOnHost);
        } catch (err) {
          throw badRequest(
            `Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: ${osErrorText(err)} ${config.pathOnHost}`,
          );
        }
        this.drives.set(config.driveId, config);
        return empty();
      }
      case 'InsertNetworkDevice': {
        this.bootPath = true;
        for (const n of this.nics.values()) {
          if (n.ifaceId !== action.config.ifaceId && n.hostDevName === action.config.hostDevName) {
            throw badRequest(
              `Network config error: Could not create the network device: Open tap device failed: Resource busy (os error 16). Invalid TUN/TAP Backend provided by ${action.config.hostDevName}. Check our documentation on setting up the network devices.`,
            );
          }
        }
        this.nics.set(action.config.ifaceId, action.config);
        return empty();
      }
      case 'SetMmdsConfig':
        this.bootPath = true;
        this.mmdsConfig = {
          version: action.value['version'] ?? 'V1',
          network_interfaces: action.value['network_interfaces'],
          ipv4_address: action.value['ipv4_address'] ?? '169.254.169.254',
          imds_compat: action.value['imds_compat'] ?? false,
        };
        return empty();
      case 'ConfigureLogger':
        this.loggerConfig = action.value;
        return empty();
      case 'ConfigureMetrics':
        this.metricsConfig = action.value;
        return empty();
      case 'StartMicroVm': {
        if (!this.bootSource) throw badRequest(MISSING_KERNEL);
        try {
          this.vm = await Microvm.boot(
            {
              machine: this.machine,
              bootSource: this.bootSource,
              drives: [...this.drives.values()],
              networkInterfaces: [...this.nics.values()],
            },
            this.settings,
          );
        } catch (err) {
          throw badRequest(prefixed('Start microvm error: ', (err as Error).message));
        }
        this.vm.mmdsValue = this.mmds ?? null;
        this.settings.logger.info({ state: this.vm.state, machine: this.machine }, 'microVM booted (cold boot image)');
        return empty();
      }
      case 'LoadSnapshot': {
        if (this.bootPath) throw badRequest(LOAD_NOT_ALLOWED);
        const p = action.params;
        try {
          this.vm = await Microvm.load(p, this.settings, this.stopping.signal);
        } catch (err) {
          // Firecracker deems the process too dirty to go on after a failed restore (fatal_error).
          throw badRequest(prefixed('Load snapshot error: ', (err as Error).message), true);
        }
        this.vm.mmdsValue = this.mmds ?? null;
        if (p.resumeVm) this.vm.resume();
        this.settings.logger.info(
          {
            snapshot: p.snapshotPath,
            backend: p.backendType,
            backendPath: p.backendPath,
            state: this.vm.state,
            steps: this.vm.loadSteps?.done(),
          },
          'snapshot loaded',
        );
        return empty();
      }
      case 'CreateSnapshot':
      case 'Pause':
      case 'Resume':
      case 'FlushMetrics':
      case 'SendCtrlAltDel':
        throw badRequest(PRE_BOOT_UNSUPPORTED);
    }
    throw badRequest(PRE_BOOT_UNSUPPORTED);
  }

  private async handleRuntime(vm: Microvm, action: VmmAction): Promise<ActionResult> {
    switch (action.kind) {
      case 'Pause':
        await vm.pause();
        this.settings.logger.info('microVM paused');
        return empty();
      case 'Resume':
        vm.resume();
        this.settings.logger.info('microVM resumed');
        return empty();
      case 'CreateSnapshot':
        if (vm.state !== 'Paused') throw badRequest(SNAPSHOT_WHILE_RUNNING);
        try {
          await vm.createSnapshot(action.params);
        } catch (err) {
          throw badRequest((err as Error).message);
        }
        return empty();
      case 'FlushMetrics':
      case 'ConfigureLogger':
      case 'ConfigureMetrics':
        return empty();
      case 'SendCtrlAltDel':
        return empty();
      default:
        throw badRequest(POST_BOOT_UNSUPPORTED);
    }
  }

  private machineOfVm(vm: Microvm): MachineConfig {
    return {
      vcpuCount: vm.config.vcpuCount,
      memSizeMib: vm.config.memSizeMib,
      smt: vm.config.smt,
      trackDirtyPages: vm.trackDirtyPages,
      hugePages: vm.config.pageSize === 4096 ? 'None' : '2M',
    };
  }

  /**
   * Firecracker's VmmConfig as GET /vm/config serializes it (v1.16: every device kind, null or
   * empty where not configured, in the struct's order).
   */
  private fullConfig(): Record<string, unknown> {
    const vm = this.vm;
    const drives = vm ? vm.config.drives : [...this.drives.values()];
    const nics = vm ? vm.config.networkInterfaces : [...this.nics.values()];
    const boot = vm ? vm.config.bootSource : this.bootSource;
    return {
      balloon: null,
      drives: drives.map((d) => ({
        drive_id: d.driveId,
        partuuid: null,
        is_root_device: d.isRootDevice,
        cache_type: 'Unsafe',
        is_read_only: d.isReadOnly,
        path_on_host: d.pathOnHost,
        rate_limiter: null,
        io_engine: 'Sync',
        socket: null,
      })),
      'boot-source': {
        kernel_image_path: boot?.kernelImagePath ?? '',
        initrd_path: boot?.initrdPath ?? null,
        boot_args: boot?.bootArgs ?? null,
      },
      'cpu-config': null,
      logger: this.loggerConfig,
      'machine-config': machineJson(vm ? this.machineOfVm(vm) : this.machine),
      metrics: this.metricsConfig,
      'mmds-config': this.mmdsConfig,
      'network-interfaces': nics.map((n) => ({
        iface_id: n.ifaceId,
        host_dev_name: n.hostDevName,
        guest_mac: n.guestMac ?? null,
        rx_rate_limiter: null,
        tx_rate_limiter: null,
      })),
      vsock: null,
      entropy: null,
      pmem: [],
      'memory-hotplug': null,
    };
  }

  /** A load still in progress fails and gives back what it took (the process is stopping). */
  abandonLoad(): void {
    this.stopping.abort();
  }

  async shutdown(): Promise<void> {
    this.stopping.abort();
    const vm = this.vm;
    this.vm = undefined;
    await vm?.close();
  }
}

function ok(body: unknown): ActionResult {
  return { status: 200, body };
}

function empty(): ActionResult {
  return { status: 204 };
}

function prefixed(prefix: string, message: string): string {
  return message.startsWith(prefix) ? message : prefix + message;
}

function machineJson(m: MachineConfig): Record<string, unknown> {
  return {
    vcpu_count: m.vcpuCount,
    mem_size_mib: m.memSizeMib,
    smt: m.smt,
    track_dirty_pages: m.trackDirtyPages,
    huge_pages: m.hugePages,
  };
}

/** vmm_config/machine_config.rs limits: 1..=32 vCPUs, an even count with SMT, memory > 0. */
function validMachine(m: MachineConfig): MachineConfig {
  if (m.vcpuCount < 1 || m.vcpuCount > 32 || (m.smt && m.vcpuCount > 1 && m.vcpuCount % 2 !== 0)) {
    throw badRequest(
      'Machine config error: The vCPU number is invalid: it can only be 1 or an even number when SMT is enabled.',
    );
  }
  if (m.memSizeMib < 1) throw badRequest('Machine config error: The memory size (MiB) is invalid.');
  return m;
}
