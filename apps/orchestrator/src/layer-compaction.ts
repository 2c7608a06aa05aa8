import { open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  FileBlocks,
  NIL_UUID,
  type BuildDataFile,
  type BuildMapping,
  type BuildStore,
  type Header,
  type ReadableBlocks,
} from '#storage';

const COPY_CHUNK = 4 * 1024 * 1024;

/** How many builds a header's mappings read from (the nil UUID is not a layer). */
export function layerCount(header: Header): number {
  return new Set(header.mappings.filter((m) => m.buildId !== NIL_UUID).map((m) => m.buildId)).size;
}

/**
 * Rewrites a build file whose chain has passed the generation cap as one layer: every stored
 * byte the header maps is copied, in offset order, into the new build's data file, and the
 * header then points only at the new build (zeros stay the nil UUID). Like the seed's Full
 * snapshot after `maxDiffGenerations`, reads then touch one file instead of the whole chain.
 * The base build id stays: the snapfile still names the base build's rootfs path.
 */
export async function compactLayers(
  header: Header,
  dir: string,
  name: BuildDataFile,
  builds: BuildStore,
): Promise<Header> {
  const newBuildId = header.metadata.buildId;
  // The new build's own diff is still staged in `dir`; every other layer comes through the store.
  const own = await FileBlocks.open(join(dir, name));
  const tmpPath = join(dir, `${name}.compact`);
  const out = await open(tmpPath, 'w');
  const source = (id: string): Promise<ReadableBlocks> =>
    id === newBuildId ? Promise.resolve(own) : builds.dataFile(id, name);
  const mappings: BuildMapping[] = [];
  let written = 0;
  try {
    const buf = Buffer.alloc(COPY_CHUNK);
    for (const m of header.mappings) {
      if (m.buildId === NIL_UUID) {
        mappings.push({ ...m });
        continue;
      }
      const src = await source(m.buildId);
      for (let done = 0; done < m.length;) {
        const n = Math.min(COPY_CHUNK, m.length - done);
        await src.readAt(buf.subarray(0, n), m.buildStorageOffset + done);
        await out.write(buf, 0, n, written + done);
        done += n;
      }
      mappings.push({ offset: m.offset, length: m.length, buildId: newBuildId, buildStorageOffset: written });
      written += m.length;
    }
    await out.sync();
  } catch (err) {
    await out.close();
    await rm(tmpPath, { force: true });
    throw err;
  } finally {
    await own.close();
  }
  await out.close();
  await rename(tmpPath, join(dir, name));
  return { metadata: { ...header.metadata }, mappings: coalesce(mappings) };
}

/** Neighbouring mappings to the same build at consecutive storage offsets become one. */
function coalesce(mappings: BuildMapping[]): BuildMapping[] {
  const out: BuildMapping[] = [];
  for (const m of mappings) {
    const prev = out[out.length - 1];
    if (
      prev &&
      prev.buildId === m.buildId &&
      prev.offset + prev.length === m.offset &&
      (m.buildId === NIL_UUID || prev.buildStorageOffset + prev.length === m.buildStorageOffset)
    ) {
      prev.length += m.length;
    } else out.push({ ...m });
  }
  return out;
}
