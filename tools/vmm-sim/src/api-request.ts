import { badRequest, deserializeError } from './api-error.js';
import { SerdeJsonError, deserialize, type Field, type Shape } from './serde-json.js';

/**
 * Firecracker's API request parsing, as pure functions: (method, path, body) → one VMM
 * action, or the ApiFault Firecracker answers with. Routing and wording follow
 * api_server/parsed_request.rs and api_server/request/*.rs; bodies are read as serde_json
 * reads them into Firecracker's structs (`deny_unknown_fields`), positions in the messages
 * included (serde-json.ts).
 */

export interface BootSourceConfig {
  kernelImagePath: string;
  bootArgs?: string;
  initrdPath?: string;
}

export interface MachineConfig {
  vcpuCount: number;
  memSizeMib: number;
  smt: boolean;
  trackDirtyPages: boolean;
  hugePages: 'None' | '2M';
}

export interface DriveConfig {
  driveId: string;
  pathOnHost: string;
  isRootDevice: boolean;
  isReadOnly: boolean;
}

export interface NetworkInterfaceConfig {
  ifaceId: string;
  hostDevName: string;
  guestMac?: string;
}

export interface LoadSnapshotParams {
  snapshotPath: string;
  backendType: 'Uffd' | 'File';
  backendPath: string;
  enableDiffSnapshots: boolean;
  resumeVm: boolean;
  networkOverrides: { ifaceId: string; hostDevName: string }[];
}

export interface CreateSnapshotParams {
  snapshotType: 'Full' | 'Diff';
  snapshotPath: string;
  memFilePath: string;
}

export type VmmAction =
  | { kind: 'GetInstanceInfo' }
  | { kind: 'GetVersion' }
  | { kind: 'GetMachineConfig' }
  | { kind: 'GetFullVmConfig' }
  | { kind: 'GetMmds' }
  | { kind: 'PutMmds'; value: unknown }
  | { kind: 'PatchMmds'; value: unknown }
  | { kind: 'ConfigureBootSource'; config: BootSourceConfig }
  | { kind: 'PutMachineConfig'; config: MachineConfig }
  | { kind: 'PatchMachineConfig'; update: Partial<MachineConfig> }
  | { kind: 'InsertBlockDevice'; config: DriveConfig }
  | { kind: 'InsertNetworkDevice'; config: NetworkInterfaceConfig }
  | { kind: 'ConfigureLogger'; value: Record<string, unknown> }
  | { kind: 'ConfigureMetrics'; value: Record<string, unknown> }
  | { kind: 'SetMmdsConfig'; value: Record<string, unknown> }
  | { kind: 'StartMicroVm' }
  | { kind: 'FlushMetrics' }
  | { kind: 'SendCtrlAltDel' }
  | { kind: 'LoadSnapshot'; params: LoadSnapshotParams }
  | { kind: 'CreateSnapshot'; params: CreateSnapshotParams }
  | { kind: 'Pause' }
  | { kind: 'Resume' };

export type Method = 'GET' | 'PUT' | 'PATCH';

/** Firecracker's default `--http-api-max-payload-size`. */
export const MAX_PAYLOAD_BYTES = 51_200;

export function parseRequest(method: string, path: string, body: Buffer | undefined): VmmAction {
  const hasBody = body !== undefined && body.length > 0;
  const tokens = path
    .replace(/\?.*$/, '')
    .replace(/^\/+/, '')
    .split('/')
    .filter((t, i, all) => t !== '' || i < all.length - 1);
  const first = tokens[0] ?? '';
  const second = tokens[1];
  if (method !== 'GET' && method !== 'PUT' && method !== 'PATCH') {
    throw badRequest(`Invalid request method and/or path: ${method} ${first}.`);
  }
  if (method === 'GET') {
    if (hasBody) throw badRequest('GET request cannot have a body.');
    switch (first) {
      case '':
        return { kind: 'GetInstanceInfo' };
      case 'version':
        return { kind: 'GetVersion' };
      case 'machine-config':
        return { kind: 'GetMachineConfig' };
      case 'mmds':
        return { kind: 'GetMmds' };
      case 'vm':
        if (second === 'config') return { kind: 'GetFullVmConfig' };
        break;
    }
    throw badRequest(`Invalid request method and/or path: GET ${first}.`);
  }
  if (!hasBody) throw badRequest(method === 'PUT' ? 'Empty PUT request.' : 'Empty PATCH request.');
  if (method === 'PUT') {
    switch (first) {
      case 'actions':
        return parseAction(read(body, ACTION_BODY));
      case 'boot-source':
        return { kind: 'ConfigureBootSource', config: parseBootSource(read(body, BOOT_SOURCE)) };
      case 'machine-config':
        return { kind: 'PutMachineConfig', config: parseMachineConfig(read(body, MACHINE_CONFIG)) };
      case 'drives': {
        const id = checkedId(second, 'drive');
        return { kind: 'InsertBlockDevice', config: parseDrive(read(body, BLOCK_DEVICE), id) };
      }
      case 'network-interfaces': {
        const id = checkedId(second, 'iface');
        return { kind: 'InsertNetworkDevice', config: parseNetwork(read(body, NETWORK_INTERFACE), id) };
      }
      case 'mmds':
        if (second === 'config') return { kind: 'SetMmdsConfig', value: read(body, MMDS_CONFIG) };
        return { kind: 'PutMmds', value: read(body, VALUE) };
      case 'logger':
        return { kind: 'ConfigureLogger', value: read(body, LOGGER) };
      case 'metrics':
        return { kind: 'ConfigureMetrics', value: read(body, METRICS) };
      case 'snapshot':
        if (second === 'create')
          return { kind: 'CreateSnapshot', params: parseSnapshotCreate(read(body, SNAPSHOT_CREATE)) };
        if (second === 'load') return { kind: 'LoadSnapshot', params: parseSnapshotLoad(read(body, SNAPSHOT_LOAD)) };
        if (second === undefined) throw badRequest('Missing snapshot operation type.');
        throw badRequest(`Invalid request method and/or path: PUT /snapshot/${second}.`);
    }
    throw badRequest(`Invalid request method and/or path: PUT ${first}.`);
  }
  switch (first) {
    case 'vm':
      return read(body, VM).state === 'Paused' ? { kind: 'Pause' } : { kind: 'Resume' };
    case 'mmds':
      return { kind: 'PatchMmds', value: read(body, VALUE) };
    case 'machine-config':
      return { kind: 'PatchMachineConfig', update: parseMachineConfigPatch(read(body, MACHINE_CONFIG_UPDATE)) };
  }
  throw badRequest(`Invalid request method and/or path: PATCH ${first}.`);
}

/** serde_json::from_slice into one of Firecracker's request structs. */
function read(body: Buffer, shape: Shape): Record<string, unknown> {
  try {
    return deserialize(body, shape) as Record<string, unknown>;
  } catch (err) {
    if (err instanceof SerdeJsonError) throw deserializeError(err.message);
    throw err;
  }
}

/** api_server/parsed_request.rs `checked_id`. */
function checkedId(id: string | undefined, what: 'drive' | 'iface'): string {
  if (id === undefined) throw badRequest(what === 'drive' ? 'Missing drive id.' : 'Missing iface id.');
  if (id === '') throw badRequest('The ID cannot be empty.');
  if (!/^[\p{L}\p{N}_]+$/u.test(id)) {
    throw badRequest('API Resource IDs can only contain alphanumeric characters and underscores.');
  }
  return id;
}

// Firecracker's request structs (vmm/src/vmm_config/*.rs, v1.16), as serde sees them.
const str: Shape = { type: 'string' };
const path: Shape = { type: 'path' };
const bool: Shape = { type: 'bool' };
const VALUE: Shape = { type: 'value' };
const option = (shape: Shape): Field => ({ shape, absent: 'option' });
const byDefault = (shape: Shape): Field => ({ shape, absent: 'default' });
const required = (shape: Shape): Field => ({ shape });
const struct = (name: string, fields: Record<string, Field>): Shape => ({ type: 'struct', name, fields });
const enumeration = (name: string, variants: readonly string[]): Shape => ({ type: 'enum', name, variants });

const VM = struct('Vm', { state: required(enumeration('VmState', ['Paused', 'Resumed'])) });
const ACTION_BODY = struct('ActionBody', {
  action_type: required(enumeration('ActionType', ['FlushMetrics', 'InstanceStart', 'SendCtrlAltDel'])),
});
const BOOT_SOURCE = struct('BootSourceConfig', {
  kernel_image_path: required(str),
  initrd_path: option(str),
  boot_args: option(str),
});
const HUGE_PAGES = enumeration('HugePageConfig', ['None', '2M']);
const MACHINE_CONFIG = struct('MachineConfig', {
  vcpu_count: required({ type: 'uint', name: 'u8' }),
  mem_size_mib: required({ type: 'uint', name: 'usize' }),
  smt: byDefault(bool),
  cpu_template: option(VALUE),
  track_dirty_pages: byDefault(bool),
  huge_pages: byDefault(HUGE_PAGES),
});
const MACHINE_CONFIG_UPDATE = struct('MachineConfigUpdate', {
  vcpu_count: option({ type: 'uint', name: 'u8' }),
  mem_size_mib: option({ type: 'uint', name: 'usize' }),
  smt: option(bool),
  cpu_template: option(VALUE),
  track_dirty_pages: option(bool),
  huge_pages: option(HUGE_PAGES),
});
const BLOCK_DEVICE = struct('BlockDeviceConfig', {
  drive_id: required(str),
  partuuid: option(str),
  is_root_device: required(bool),
  cache_type: byDefault(enumeration('CacheType', ['Unsafe', 'Writeback'])),
  is_read_only: option(bool),
  path_on_host: option(str),
  rate_limiter: option(VALUE),
  io_engine: option(enumeration('FileEngineType', ['Async', 'Sync'])),
  socket: option(str),
});
const NETWORK_INTERFACE = struct('NetworkInterfaceConfig', {
  iface_id: required(str),
  host_dev_name: required(str),
  guest_mac: option(str),
  rx_rate_limiter: option(VALUE),
  tx_rate_limiter: option(VALUE),
});
const MMDS_CONFIG = struct('MmdsConfig', {
  version: byDefault(enumeration('MmdsVersion', ['V1', 'V2'])),
  network_interfaces: required({ type: 'seq', item: str }),
  ipv4_address: option(str),
  imds_compat: byDefault(bool),
});
const LOGGER = struct('LoggerConfig', {
  log_path: option(path),
  level: option(VALUE),
  show_level: option(bool),
  show_log_origin: option(bool),
  module: option(str),
});
const METRICS = struct('MetricsConfig', { metrics_path: required(path) });
const SNAPSHOT_CREATE = struct('CreateSnapshotParams', {
  snapshot_type: byDefault(enumeration('SnapshotType', ['Diff', 'Full'])),
  snapshot_path: required(path),
  mem_file_path: required(path),
});
const SNAPSHOT_LOAD = struct('LoadSnapshotConfig', {
  snapshot_path: required(path),
  mem_file_path: option(path),
  mem_backend: option(
    struct('MemBackendConfig', {
      backend_path: required(path),
      backend_type: required(enumeration('MemBackendType', ['File', 'Uffd'])),
    }),
  ),
  enable_diff_snapshots: byDefault(bool),
  track_dirty_pages: byDefault(bool),
  resume_vm: byDefault(bool),
  network_overrides: byDefault({
    type: 'seq',
    item: struct('NetworkOverride', { iface_id: required(str), host_dev_name: required(str) }),
  }),
});

function parseAction(obj: Record<string, unknown>): VmmAction {
  const type = obj['action_type'];
  if (type === 'InstanceStart') return { kind: 'StartMicroVm' };
  if (type === 'FlushMetrics') return { kind: 'FlushMetrics' };
  return { kind: 'SendCtrlAltDel' };
}

function parseBootSource(obj: Record<string, unknown>): BootSourceConfig {
  const config: BootSourceConfig = { kernelImagePath: obj['kernel_image_path'] as string };
  if (typeof obj['boot_args'] === 'string') config.bootArgs = obj['boot_args'];
  if (typeof obj['initrd_path'] === 'string') config.initrdPath = obj['initrd_path'];
  return config;
}

function parseMachineConfigPatch(obj: Record<string, unknown>): Partial<MachineConfig> {
  const update: Partial<MachineConfig> = {};
  if (typeof obj['vcpu_count'] === 'number') update.vcpuCount = obj['vcpu_count'];
  if (typeof obj['mem_size_mib'] === 'number') update.memSizeMib = obj['mem_size_mib'];
  if (typeof obj['smt'] === 'boolean') update.smt = obj['smt'];
  if (typeof obj['track_dirty_pages'] === 'boolean') update.trackDirtyPages = obj['track_dirty_pages'];
  if (obj['huge_pages'] === 'None' || obj['huge_pages'] === '2M') update.hugePages = obj['huge_pages'];
  return update;
}

function parseMachineConfig(obj: Record<string, unknown>): MachineConfig {
  const update = parseMachineConfigPatch(obj);
  return {
    vcpuCount: update.vcpuCount ?? 1,
    memSizeMib: update.memSizeMib ?? 128,
    smt: update.smt ?? false,
    trackDirtyPages: update.trackDirtyPages ?? false,
    hugePages: update.hugePages ?? 'None',
  };
}

function parseDrive(obj: Record<string, unknown>, pathId: string): DriveConfig {
  if (obj['drive_id'] !== pathId) throw badRequest('The id from the path does not match the id from the body!');
  if (typeof obj['path_on_host'] !== 'string') {
    throw badRequest('Drive config error: Unable to create the block device: path_on_host is required');
  }
  return {
    driveId: pathId,
    pathOnHost: obj['path_on_host'],
    isRootDevice: obj['is_root_device'] as boolean,
    isReadOnly: obj['is_read_only'] === true,
  };
}

function parseNetwork(obj: Record<string, unknown>, pathId: string): NetworkInterfaceConfig {
  if (obj['iface_id'] !== pathId) {
    throw badRequest('The id from the path does not match the id from the body!');
  }
  const config: NetworkInterfaceConfig = { ifaceId: pathId, hostDevName: obj['host_dev_name'] as string };
  if (typeof obj['guest_mac'] === 'string') config.guestMac = obj['guest_mac'];
  return config;
}

/** api_server/request/snapshot.rs: `mem_backend` and the deprecated `mem_file_path` exclude each other. */
function parseSnapshotLoad(obj: Record<string, unknown>): LoadSnapshotParams {
  const memFile = obj['mem_file_path'];
  const backend = obj['mem_backend'] as Record<string, unknown> | undefined;
  if (memFile !== undefined && backend !== undefined) {
    throw deserializeError('too many fields: either `mem_backend` or `mem_file_path` exclusively is required');
  }
  let backendType: 'Uffd' | 'File' = 'File';
  let backendPath: string;
  if (backend !== undefined) {
    backendType = backend['backend_type'] as 'Uffd' | 'File';
    backendPath = backend['backend_path'] as string;
  } else if (typeof memFile === 'string') {
    backendPath = memFile;
  } else {
    throw deserializeError('missing field: either `mem_backend` or `mem_file_path` is required');
  }
  const overrides = ((obj['network_overrides'] as Record<string, unknown>[] | undefined) ?? []).map((o) => ({
    ifaceId: o['iface_id'] as string,
    hostDevName: o['host_dev_name'] as string,
  }));
  return {
    snapshotPath: obj['snapshot_path'] as string,
    backendType,
    backendPath,
    enableDiffSnapshots: obj['enable_diff_snapshots'] === true || obj['track_dirty_pages'] === true,
    resumeVm: obj['resume_vm'] === true,
    networkOverrides: overrides,
  };
}

function parseSnapshotCreate(obj: Record<string, unknown>): CreateSnapshotParams {
  return {
    snapshotType: obj['snapshot_type'] === 'Diff' ? 'Diff' : 'Full',
    snapshotPath: obj['snapshot_path'] as string,
    memFilePath: obj['mem_file_path'] as string,
  };
}
