import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';

/**
 * Replaces `path` so that a crash of the process or of the machine leaves either the old or the
 * new contents, never a mix: what a guest's flush made durable must stay so.
 */
export async function writeDurably(path: string, contents: Uint8Array): Promise<void> {
  await replaceFile(path, contents, true);
}

/**
 * Replaces `path` so that a crash of this process leaves either the old or the new contents.
 * Enough for a new device's first files: a machine crash ends its sandbox too (the VMM and its
 * memory are gone), so only a block-server restart has to find them, and the page cache keeps
 * them across that. Saves the six fsyncs (file and directory, three files) that made a device
 * open cost 6–20 ms of a create on a busy disk.
 */
export async function writeAtomically(path: string, contents: Uint8Array): Promise<void> {
  await replaceFile(path, contents, false);
}

async function replaceFile(path: string, contents: Uint8Array, sync: boolean): Promise<void> {
  const tmp = `${path}.tmp`;
  const handle = await open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(contents);
    if (sync) await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(tmp, path);
  if (!sync) return;
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
