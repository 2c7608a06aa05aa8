import { closeSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';

/**
 * Replaces `path` so that a crash of the process or of the machine leaves either the old or the
 * new contents, never a mix: what a guest's flush made durable must stay so.
 */
export async function writeDurably(path: string, contents: Uint8Array): Promise<void> {
  const tmp = `${path}.tmp`;
  const handle = await open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(contents);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(tmp, path);
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/**
 * Replaces `path` so that a crash of this process leaves either the old or the new contents.
 * Enough for a new device's first files: a machine crash ends its sandbox too (the VMM and its
 * memory are gone), so only a block-server restart has to find them, and the page cache keeps
 * them across that. No fsync (six of them made a device open cost 6–20 ms of a create on a busy
 * disk), and done on the event loop: writing a few KiB into the page cache takes microseconds,
 * while each of the four steps through the libuv pool (open, write, close, rename) waits for a
 * turn of a loop that also serves every other device (0.1–1 ms each on a loaded node).
 */
export function writeAtomically(path: string, contents: Uint8Array): void {
  const tmp = `${path}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    for (let done = 0; done < contents.length;) done += writeSync(fd, contents, done, contents.length - done);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
}

/**
 * A small state file's bytes, or undefined when there is none; on the event loop like
 * writeAtomically. An overlay's state and journal are read this way when it opens: a new
 * one's are absent, a reopened one's are read once, at the block-server's start.
 */
export function readIfPresent(path: string): Buffer | undefined {
  try {
    return readFileSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}
