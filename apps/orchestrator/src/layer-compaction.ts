import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { NIL_UUID, type BuildMapping, type Header } from '#storage';

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
  name: string,
  dataPath: (buildId: string) => Promise<string>,
): Promise<Header> {
  const newBuildId = header.metadata.buildId;
  const tmpPath = join(dir, `${name}.compact`);
  const out = await open(tmpPath, 'w');
  const sources = new Map<string, FileHandle>();
  const mappings: BuildMapping[] = [];
  let written = 0;
  try {
    const buf = Buffer.alloc(COPY_CHUNK);
    for (const m of header.mappings) {
      if (m.buildId === NIL_UUID) {
        mappings.push({ ...m });
        continue;
      }
      let src = sources.get(m.buildId);
      if (!src) {
        src = await open(await dataPath(m.buildId), 'r');
        sources.set(m.buildId, src);
      }
      for (let done = 0; done < m.length;) {
        const n = Math.min(COPY_CHUNK, m.length - done);
        const { bytesRead } = await src.read(buf, 0, n, m.buildStorageOffset + done);
        // A short read past a layer's end is zeros (a sparse diff cut short); keep sizes exact.
        if (bytesRead < n) buf.fill(0, bytesRead, n);
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
    for (const fh of sources.values()) await fh.close().catch(() => undefined);
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
