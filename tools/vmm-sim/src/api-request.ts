import { badRequest, deserializeError } from './api-error.js';

/**
 * Firecracker's API request parsing, as pure functions: (method, path, body) → one VMM
 * action, or the ApiFault Firecracker answers with. Routing and wording follow
 * api_server/parsed_request.rs and api_server/request/*.rs; bodies are checked the way
 * serde with `deny_unknown_fields` checks them (missing, unknown and mistyped fields).
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
  | { kind: 'ConfigureLogger' }
  | { kind: 'ConfigureMetrics' }
  | { kind: 'SetMmdsConfig' }
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
  const json = parseJson(body);
  if (method === 'PUT') {
    switch (first) {
      case 'actions':
        return parseAction(json);
      case 'boot-source':
        return { kind: 'ConfigureBootSource', config: parseBootSource(json) };
      case 'machine-config':
        return { kind: 'PutMachineConfig', config: parseMachineConfig(json) };
      case 'drives':
        return { kind: 'InsertBlockDevice', config: parseDrive(json, checkedId(second, 'drive')) };
      case 'network-interfaces':
        return { kind: 'InsertNetworkDevice', config: parseNetwork(json, checkedId(second, 'iface')) };
      case 'mmds':
        if (second === 'config') {
          fields(json, { version: 'string', network_interfaces: 'array', ipv4_address: 'string', imds_compat: 'bool' });
          return { kind: 'SetMmdsConfig' };
        }
        return { kind: 'PutMmds', value: json };
      case 'logger':
        fields(json, {
          log_path: 'string',
          level: 'string',
          show_level: 'bool',
          show_log_origin: 'bool',
          module: 'string',
        });
        return { kind: 'ConfigureLogger' };
      case 'metrics':
        fields(json, { metrics_path: 'string' }, ['metrics_path']);
        return { kind: 'ConfigureMetrics' };
      case 'snapshot':
        if (second === 'create') return { kind: 'CreateSnapshot', params: parseSnapshotCreate(json) };
        if (second === 'load') return { kind: 'LoadSnapshot', params: parseSnapshotLoad(json) };
        if (second === undefined) throw badRequest('Missing snapshot operation type.');
        throw badRequest(`Invalid request method and/or path: PUT /snapshot/${second}.`);
    }
    throw badRequest(`Invalid request method and/or path: PUT ${first}.`);
  }
  switch (first) {
    case 'vm':
      return parseVmState(json);
    case 'mmds':
      return { kind: 'PatchMmds', value: json };
    case 'machine-config':
      return { kind: 'PatchMachineConfig', update: parseMachineConfigPatch(json) };
  }
  throw badRequest(`Invalid request method and/or path: PATCH ${first}.`);
}

function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString('utf8')) as unknown;
  } catch (err) {
    throw deserializeError((err as Error).message);
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

type FieldType = 'string' | 'bool' | 'u64' | 'object' | 'array' | 'any';

/**
 * Checks a JSON object against a field list the way serde does for a struct with
 * `deny_unknown_fields`, and returns it. Messages use serde_json's wording.
 */
function fields(value: unknown, spec: Record<string, FieldType>, required: string[] = []): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw deserializeError(`invalid type: ${describe(value)}, expected a struct`);
  }
  const obj = value as Record<string, unknown>;
  for (const key of Object.keys(obj)) {
    if (!(key in spec)) {
      const expected = Object.keys(spec)
        .map((k) => `\`${k}\``)
        .join(', ');
      throw deserializeError(`unknown field \`${key}\`, expected one of ${expected}`);
    }
    const type = spec[key] ?? 'any';
    const v = obj[key];
    if (v === null && !required.includes(key)) continue;
    if (!matches(v, type)) throw deserializeError(`invalid type: ${describe(v)}, expected ${expectedText(type)}`);
  }
  for (const key of required) {
    if (obj[key] === undefined) throw deserializeError(`missing field \`${key}\``);
  }
  return obj;
}

function matches(v: unknown, type: FieldType): boolean {
  switch (type) {
    case 'string':
      return typeof v === 'string';
    case 'bool':
      return typeof v === 'boolean';
    case 'u64':
      return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
    case 'object':
      return typeof v === 'object' && v !== null && !Array.isArray(v);
    case 'array':
      return Array.isArray(v);
    case 'any':
      return true;
  }
}

function expectedText(type: FieldType): string {
  return { string: 'a string', bool: 'a boolean', u64: 'u64', object: 'a struct', array: 'a sequence', any: 'a value' }[
    type
  ];
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'sequence';
  if (typeof v === 'string') return `string ${JSON.stringify(v)}`;
  if (typeof v === 'boolean') return `boolean \`${v}\``;
  if (typeof v === 'number') return Number.isInteger(v) ? `integer \`${v}\`` : `floating point \`${v}\``;
  return 'map';
}

function variant<T extends string>(v: unknown, allowed: readonly T[]): T {
  if (typeof v !== 'string') throw deserializeError(`invalid type: ${describe(v)}, expected a string`);
  if (!(allowed as readonly string[]).includes(v)) {
    throw deserializeError(`unknown variant \`${v}\`, expected one of ${allowed.map((a) => `\`${a}\``).join(', ')}`);
  }
  return v as T;
}

function parseAction(json: unknown): VmmAction {
  const obj = fields(json, { action_type: 'string' }, ['action_type']);
  const type = variant(obj['action_type'], ['FlushMetrics', 'InstanceStart', 'SendCtrlAltDel'] as const);
  if (type === 'InstanceStart') return { kind: 'StartMicroVm' };
  if (type === 'FlushMetrics') return { kind: 'FlushMetrics' };
  return { kind: 'SendCtrlAltDel' };
}

function parseBootSource(json: unknown): BootSourceConfig {
  const obj = fields(json, { kernel_image_path: 'string', initrd_path: 'string', boot_args: 'string' }, [
    'kernel_image_path',
  ]);
  const config: BootSourceConfig = { kernelImagePath: obj['kernel_image_path'] as string };
  if (typeof obj['boot_args'] === 'string') config.bootArgs = obj['boot_args'];
  if (typeof obj['initrd_path'] === 'string') config.initrdPath = obj['initrd_path'];
  return config;
}

const MACHINE_FIELDS: Record<string, FieldType> = {
  vcpu_count: 'u64',
  mem_size_mib: 'u64',
  smt: 'bool',
  cpu_template: 'any',
  track_dirty_pages: 'bool',
  huge_pages: 'string',
};

function parseMachineConfigPatch(json: unknown): Partial<MachineConfig> {
  const obj = fields(json, MACHINE_FIELDS);
  const update: Partial<MachineConfig> = {};
  if (typeof obj['vcpu_count'] === 'number') update.vcpuCount = obj['vcpu_count'];
  if (typeof obj['mem_size_mib'] === 'number') update.memSizeMib = obj['mem_size_mib'];
  if (typeof obj['smt'] === 'boolean') update.smt = obj['smt'];
  if (typeof obj['track_dirty_pages'] === 'boolean') update.trackDirtyPages = obj['track_dirty_pages'];
  if (obj['huge_pages'] !== undefined && obj['huge_pages'] !== null) {
    update.hugePages = variant(obj['huge_pages'], ['None', '2M'] as const);
  }
  return update;
}

function parseMachineConfig(json: unknown): MachineConfig {
  fields(json, MACHINE_FIELDS, ['vcpu_count', 'mem_size_mib']);
  const update = parseMachineConfigPatch(json);
  return {
    vcpuCount: update.vcpuCount ?? 1,
    memSizeMib: update.memSizeMib ?? 128,
    smt: update.smt ?? false,
    trackDirtyPages: update.trackDirtyPages ?? false,
    hugePages: update.hugePages ?? 'None',
  };
}

function parseDrive(json: unknown, pathId: string): DriveConfig {
  const obj = fields(
    json,
    {
      drive_id: 'string',
      path_on_host: 'string',
      is_root_device: 'bool',
      is_read_only: 'bool',
      partuuid: 'string',
      cache_type: 'string',
      rate_limiter: 'object',
      io_engine: 'string',
      socket: 'string',
    },
    ['drive_id', 'is_root_device'],
  );
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

function parseNetwork(json: unknown, pathId: string): NetworkInterfaceConfig {
  const obj = fields(
    json,
    {
      iface_id: 'string',
      host_dev_name: 'string',
      guest_mac: 'string',
      rx_rate_limiter: 'object',
      tx_rate_limiter: 'object',
    },
    ['iface_id', 'host_dev_name'],
  );
  if (obj['iface_id'] !== pathId) {
    throw badRequest('The id from the path does not match the id from the body!');
  }
  const config: NetworkInterfaceConfig = { ifaceId: pathId, hostDevName: obj['host_dev_name'] as string };
  if (typeof obj['guest_mac'] === 'string') config.guestMac = obj['guest_mac'];
  return config;
}

/** api_server/request/snapshot.rs: `mem_backend` and the deprecated `mem_file_path` exclude each other. */
function parseSnapshotLoad(json: unknown): LoadSnapshotParams {
  const obj = fields(
    json,
    {
      snapshot_path: 'string',
      mem_file_path: 'string',
      mem_backend: 'object',
      enable_diff_snapshots: 'bool',
      track_dirty_pages: 'bool',
      resume_vm: 'bool',
      network_overrides: 'array',
    },
    ['snapshot_path'],
  );
  const memFile = obj['mem_file_path'];
  const backend = obj['mem_backend'];
  if (memFile !== undefined && memFile !== null && backend !== undefined && backend !== null) {
    throw deserializeError('too many fields: either `mem_backend` or `mem_file_path` exclusively is required');
  }
  let backendType: 'Uffd' | 'File' = 'File';
  let backendPath: string;
  if (backend !== undefined && backend !== null) {
    const b = fields(backend, { backend_path: 'string', backend_type: 'string' }, ['backend_path', 'backend_type']);
    backendType = variant(b['backend_type'], ['File', 'Uffd'] as const);
    backendPath = b['backend_path'] as string;
  } else if (typeof memFile === 'string') {
    backendPath = memFile;
  } else {
    throw deserializeError('missing field: either `mem_backend` or `mem_file_path` is required');
  }
  const overrides = ((obj['network_overrides'] as unknown[] | undefined) ?? []).map((o) => {
    const entry = fields(o, { iface_id: 'string', host_dev_name: 'string' }, ['iface_id', 'host_dev_name']);
    return { ifaceId: entry['iface_id'] as string, hostDevName: entry['host_dev_name'] as string };
  });
  return {
    snapshotPath: obj['snapshot_path'] as string,
    backendType,
    backendPath,
    enableDiffSnapshots: obj['enable_diff_snapshots'] === true || obj['track_dirty_pages'] === true,
    resumeVm: obj['resume_vm'] === true,
    networkOverrides: overrides,
  };
}

function parseSnapshotCreate(json: unknown): CreateSnapshotParams {
  const obj = fields(
    json,
    { snapshot_type: 'string', snapshot_path: 'string', mem_file_path: 'string', version: 'string' },
    ['snapshot_path', 'mem_file_path'],
  );
  const type = obj['snapshot_type'] === undefined ? 'Full' : variant(obj['snapshot_type'], ['Full', 'Diff'] as const);
  return {
    snapshotType: type,
    snapshotPath: obj['snapshot_path'] as string,
    memFilePath: obj['mem_file_path'] as string,
  };
}

function parseVmState(json: unknown): VmmAction {
  const obj = fields(json, { state: 'string' }, ['state']);
  const state = variant(obj['state'], ['Paused', 'Resumed'] as const);
  return state === 'Paused' ? { kind: 'Pause' } : { kind: 'Resume' };
}
