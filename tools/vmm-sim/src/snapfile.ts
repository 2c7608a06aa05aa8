import { z } from 'zod';
import { VmmFailure } from './api-error.js';

/**
 * The double's VM state file ("snapfile"). Firecracker's is an opaque bincode blob; ours is
 * JSON holding what the double needs to bring the same machine back: memory size and page
 * size, vCPUs, drives (with the `path_on_host` recorded at boot, which the orchestrator
 * re-points with a symlink), network interfaces and the guest's own address, MMDS, and the
 * guest's environment from envd `/init`. Pure encode/decode; a bad file gets a clear error.
 */

export const SNAPFILE_FORMAT = 'sbx-vmm-sim-snapfile';
export const SNAPFILE_VERSION = 1;

const snapfileSchema = z.strictObject({
  format: z.literal(SNAPFILE_FORMAT),
  version: z.literal(SNAPFILE_VERSION),
  memSizeMib: z
    .number()
    .int()
    .positive()
    .max(1024 * 1024),
  pageSize: z.union([z.literal(4096), z.literal(2 * 1024 * 1024)]),
  vcpuCount: z.number().int().min(1).max(32),
  smt: z.boolean(),
  /** Seed of the cold-boot memory image this machine started from (see boot-image.ts). */
  bootSeed: z.number().int().nonnegative(),
  bootSource: z
    .strictObject({ kernelImagePath: z.string(), bootArgs: z.string().optional(), initrdPath: z.string().optional() })
    .optional(),
  drives: z.array(
    z.strictObject({
      driveId: z.string().min(1),
      pathOnHost: z.string().min(1),
      isRootDevice: z.boolean(),
      isReadOnly: z.boolean(),
    }),
  ),
  networkInterfaces: z.array(
    z.strictObject({ ifaceId: z.string().min(1), hostDevName: z.string().min(1), guestMac: z.string().optional() }),
  ),
  /** The guest's side of its network, as a guest kernel would keep it in its own state. */
  guestNetwork: z.strictObject({
    address: z.ipv4(),
    prefixLength: z.number().int().min(1).max(32),
    gateway: z.ipv4(),
  }),
  mmds: z.unknown().optional(),
  envVars: z.record(z.string(), z.string()),
  createdAt: z.string(),
});

export type Snapfile = z.infer<typeof snapfileSchema>;

export class SnapfileInvalid extends VmmFailure {
  constructor(path: string, detail: string) {
    super('SNAPFILE_INVALID', `snapfile ${path} is invalid: ${detail}`, { path });
    this.name = 'SnapfileInvalid';
  }
}

export function encodeSnapfile(snapfile: Snapfile): Buffer {
  return Buffer.from(JSON.stringify(snapfileSchema.parse(snapfile), null, 2) + '\n', 'utf8');
}

export function decodeSnapfile(bytes: Uint8Array, path = '<snapfile>'): Snapfile {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    throw new SnapfileInvalid(path, `not JSON (${(err as Error).message})`);
  }
  if (typeof json === 'object' && json !== null && (json as { format?: unknown }).format !== SNAPFILE_FORMAT) {
    throw new SnapfileInvalid(path, `format is not ${SNAPFILE_FORMAT} (a real Firecracker snapfile needs Firecracker)`);
  }
  const parsed = snapfileSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new SnapfileInvalid(path, `${issue?.path.join('.') || 'root'}: ${issue?.message ?? 'invalid'}`);
  }
  if (parsed.data.memSizeMib * 1024 * 1024 < parsed.data.pageSize) {
    throw new SnapfileInvalid(path, 'memory smaller than one page');
  }
  return parsed.data;
}

export function memoryBytes(snapfile: Pick<Snapfile, 'memSizeMib'>): number {
  return snapfile.memSizeMib * 1024 * 1024;
}
