import { mkdirSync } from 'node:fs';
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { writeAtomically } from './durable-file.js';

/**
 * What a device is, persisted next to its overlay so a restarted block-server can reopen it:
 * `<data-dir>/devices/<sandboxId>/device.json`. Written once at open and when a
 * kernel device is attached or detached.
 */
export const deviceRecordSchema = z.object({
  version: z.literal(1),
  sandboxId: z.string().min(1),
  /** The build the overlay sits on ('' for a device over a local image). */
  buildId: z.string(),
  /** A local image instead of a build (tests, local tools). */
  basePath: z.string().optional(),
  socketPath: z.string().min(1),
  exportName: z.string(),
  size: z.number().int().nonnegative(),
  blockSize: z.number().int().positive(),
  /** /dev/nbdX index while attached to the kernel; reconfigured with a new socket after a restart. */
  kernelIndex: z.number().int().nonnegative().optional(),
  createdAt: z.string(),
});

export type DeviceRecord = z.infer<typeof deviceRecordSchema>;

export const SANDBOX_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function deviceDir(dataDir: string, sandboxId: string): string {
  return join(dataDir, 'devices', sandboxId);
}

/** Synchronous, like every first file of a device (durable-file.ts, writeAtomically). */
export function writeDeviceRecord(dataDir: string, record: DeviceRecord): void {
  const dir = deviceDir(dataDir, record.sandboxId);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  // Only a block-server restart reads it back (a machine crash ends the sandbox too): no fsync.
  writeAtomically(join(dir, 'device.json'), Buffer.from(JSON.stringify(record, null, 2) + '\n'));
}

/** Every device a previous run left, plus the directories that hold no usable record. */
export async function readDeviceRecords(
  dataDir: string,
): Promise<{ records: DeviceRecord[]; broken: Array<{ dir: string; problem: string }> }> {
  const root = join(dataDir, 'devices');
  const names = await readdir(root).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [] as string[];
    throw err;
  });
  const records: DeviceRecord[] = [];
  const broken: Array<{ dir: string; problem: string }> = [];
  for (const name of names.sort()) {
    const dir = join(root, name);
    try {
      const parsed = deviceRecordSchema.parse(JSON.parse(await readFile(join(dir, 'device.json'), 'utf8')));
      if (parsed.sandboxId !== name) throw new Error(`record names sandbox ${parsed.sandboxId}`);
      records.push(parsed);
    } catch (err) {
      broken.push({ dir, problem: (err as Error).message });
    }
  }
  return { records, broken };
}

export async function removeDeviceDir(dataDir: string, sandboxId: string): Promise<void> {
  await rm(deviceDir(dataDir, sandboxId), { recursive: true, force: true });
}
