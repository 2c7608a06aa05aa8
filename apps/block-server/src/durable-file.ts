import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Replaces `path` so that a crash leaves either the old or the new contents, never a mix. */
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
