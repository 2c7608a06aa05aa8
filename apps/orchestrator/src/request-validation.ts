import { isBuildId } from '#storage';
import type { SandboxConfig } from '#proto/orchestrator';
import { FieldNotServed, RequestInvalid } from './orchestrator-errors.js';

/** Sandbox, template and alias ids end up in paths, socket names and Redis keys. */
const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]*$/;
// A sandbox id is the first label of its DNS name, and a label holds at most 63 bytes (RFC 1035 §2.3.4).
export const MAX_ID_LENGTH = 63;
const MAX_ENV_VARS = 512;
const MAX_ENV_BYTES = 64 * 1024;

export function checkSafeName(field: string, value: string): string {
  if (value.length === 0) throw new RequestInvalid(field, 'is empty');
  if (value.length > MAX_ID_LENGTH) throw new RequestInvalid(field, `longer than ${MAX_ID_LENGTH} characters`);
  if (value.includes('/') || value.includes('\\')) throw new RequestInvalid(field, 'contains a path separator');
  if (value.includes('..')) throw new RequestInvalid(field, "contains '..'");
  if (!SAFE_NAME.test(value)) {
    throw new RequestInvalid(field, 'may hold only letters, digits, - and _, starting with a letter or digit');
  }
  return value;
}

export function checkBuildId(field: string, value: string): string {
  if (!isBuildId(value)) throw new RequestInvalid(field, `'${value.slice(0, 80)}' is not a UUID`);
  return value.toLowerCase();
}

export interface ResourceBounds {
  minVcpu: number;
  maxVcpu: number;
  minRamMb: number;
  maxRamMb: number;
}

/** Checks every field of a create request's config; returns it with the build id normalised. */
export function checkSandboxConfig(config: SandboxConfig | undefined, bounds: ResourceBounds): SandboxConfig {
  if (!config) throw new RequestInvalid('sandbox', 'missing');
  checkSafeName('sandbox.sandbox_id', config.sandboxId);
  checkSafeName('sandbox.template_id', config.templateId);
  if (config.baseTemplateId) checkSafeName('sandbox.base_template_id', config.baseTemplateId);
  if (config.alias !== undefined && config.alias !== '') checkSafeName('sandbox.alias', config.alias);
  if (config.teamId && config.teamId.length > 128) throw new RequestInvalid('sandbox.team_id', 'longer than 128');
  const buildId = config.buildId ? checkBuildId('sandbox.build_id', config.buildId) : '';
  if (config.snapshot && !buildId) throw new RequestInvalid('sandbox.build_id', 'required when snapshot is true');
  // 0 = unset: taken from the build (a snapshot fixes both); anything else must match it.
  if (
    !Number.isInteger(config.vcpu) ||
    (config.vcpu !== 0 && (config.vcpu < bounds.minVcpu || config.vcpu > bounds.maxVcpu))
  ) {
    throw new RequestInvalid('sandbox.vcpu', `${config.vcpu} is outside [${bounds.minVcpu}, ${bounds.maxVcpu}]`);
  }
  if (
    !Number.isInteger(config.ramMb) ||
    (config.ramMb !== 0 && (config.ramMb < bounds.minRamMb || config.ramMb > bounds.maxRamMb))
  ) {
    throw new RequestInvalid('sandbox.ram_mb', `${config.ramMb} is outside [${bounds.minRamMb}, ${bounds.maxRamMb}]`);
  }
  const mounts = config.volumeMounts ?? [];
  if (mounts.length > 0) {
    throw new FieldNotServed('sandbox.volumeMounts', `${mounts.length} mount(s) asked; this node has no volumes`);
  }
  if (config.totalDiskSizeMb < 0) throw new RequestInvalid('sandbox.total_disk_size_mb', 'negative');
  if (config.maxSandboxLength < 0) throw new RequestInvalid('sandbox.max_sandbox_length', 'negative');
  const env = Object.entries(config.envVars ?? {});
  if (env.length > MAX_ENV_VARS) throw new RequestInvalid('sandbox.env_vars', `more than ${MAX_ENV_VARS} entries`);
  let envBytes = 0;
  for (const [key, value] of env) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) {
      throw new RequestInvalid('sandbox.env_vars', `'${key.slice(0, 80)}' is not a variable name`);
    }
    envBytes += key.length + value.length;
  }
  if (envBytes > MAX_ENV_BYTES) throw new RequestInvalid('sandbox.env_vars', `larger than ${MAX_ENV_BYTES} bytes`);
  checkNetworkConfig(config);
  const policy = config.autoResume?.policy ?? '';
  if (!['', 'off', 'any'].includes(policy)) {
    throw new RequestInvalid('sandbox.auto_resume.policy', `'${policy.slice(0, 40)}' is not one of off, any`);
  }
  return { ...config, buildId };
}

/**
 * Ingress settings end up in HTTP headers: printable ASCII only. Egress rules (CIDRs, domains,
 * allow_internet_access) are checked entry by entry by net-agent, which applies them.
 */
function checkNetworkConfig(config: SandboxConfig): void {
  const ingress = config.network?.ingress;
  const token = ingress?.trafficAccessToken;
  if (token !== undefined && token !== '' && !/^[\x21-\x7e]{1,512}$/.test(token)) {
    throw new RequestInvalid('sandbox.network.ingress.traffic_access_token', '1–512 printable ASCII characters');
  }
  const host = ingress?.maskRequestHost;
  if (host !== undefined && host !== '' && !/^[A-Za-z0-9._~:[\]-]{1,255}$/.test(host)) {
    throw new RequestInvalid('sandbox.network.ingress.mask_request_host', 'not a host name (host or host:port)');
  }
}

/** Start and end times: end after start, both set (the API always sends both). */
export function checkTimes(start: Date | undefined, end: Date | undefined, now: Date): { start: Date; end: Date } {
  const startTime = start ?? now;
  if (Number.isNaN(startTime.getTime())) throw new RequestInvalid('start_time', 'not a time');
  if (!end) throw new RequestInvalid('end_time', 'missing');
  if (Number.isNaN(end.getTime())) throw new RequestInvalid('end_time', 'not a time');
  if (end.getTime() <= startTime.getTime()) throw new RequestInvalid('end_time', 'not after start_time');
  return { start: startTime, end };
}
