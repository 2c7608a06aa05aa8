import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { BuildCache } from '../src/build-cache.js';
import { newBuildId } from '../src/build-id.js';
import { BuildStore, type UploadEvent } from '../src/build-store.js';
import { GcsBackend } from '../src/gcs-backend.js';
import { encodeHeader, type Header } from '../src/header-codec.js';
import { LocalBackend } from '../src/local-backend.js';
import { baseMappings, createMappings, mergeMappings } from '../src/mappings.js';
import type { StorageBackend, UploadOptions } from '../src/storage-backend.js';
import { BuildNotFound, StorageUnavailable, UploadFailed } from '../src/storage-errors.js';
import { GcsDouble } from './gcs-double.js';

const BLOCK = 4096;
const SIZE = 64 * BLOCK;

function bytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = (i * 13 + seed * 101 + (i >> 12)) & 0xff;
  return out;
}

let work: string;
beforeEach(async () => {
  work = await mkdtemp(path.join(tmpdir(), 'sbx-build-store-'));
});
afterEach(async () => {
  await rm(work, { recursive: true, force: true });
});

const double = new GcsDouble();
beforeAll(async () => {
  await double.start();
});
afterAll(async () => {
  await double.stop();
});

function makeStore(backend: StorageBackend, extra: Partial<ConstructorParameters<typeof BuildStore>[0]> = {}) {
  const cache = new BuildCache({ cacheDir: path.join(work, 'cache'), deleteDelayMs: 10, checkIntervalMs: 3_600_000 });
  const store = new BuildStore({
    backend,
    cache,
    chunkSize: 64 * 1024,
    uploadRetry: { attempts: 3, initialDelayMs: 1, maxDelayMs: 5, multiplier: 2 },
    ...extra,
  });
  return { store, cache, close: async () => (await store.close(), await cache.close()) };
}

/**
 * Pauses a sandbox on "this node": writes the diff of `dirty` blocks into a local build
 * directory with its merged header, as block-server and the orchestrator will.
 */
async function pauseLocally(
  store: BuildStore,
  parent: Header,
  dirty: number[],
  flat: Buffer,
  seed: number,
): Promise<{ id: string; dir: string; header: Header }> {
  const id = newBuildId();
  const dir = path.join(work, 'local', id);
  await mkdir(dir, { recursive: true });
  const pieces = dirty.map((b, i) => {
    const data = bytes(BLOCK, seed * 1000 + i);
    data.copy(flat, b * BLOCK);
    return data;
  });
  await writeFile(path.join(dir, 'rootfs.ext4'), Buffer.concat(pieces));
  await writeFile(path.join(dir, 'snapfile'), `snapfile of ${id}`);
  const header: Header = {
    metadata: { ...parent.metadata, generation: parent.metadata.generation + 1, buildId: id },
    mappings: mergeMappings(parent.mappings, createMappings(dirty, BLOCK, id)),
  };
  await store.writeBuild(id, dir, { 'rootfs.ext4': header });
  return { id, dir, header };
}

async function readAll(store: BuildStore, id: string): Promise<Buffer> {
  const { file } = await store.openBuildFile(id, 'rootfs.ext4');
  const out = Buffer.alloc(file.size);
  await file.readAt(out, 0);
  await file.close();
  return out;
}

for (const kind of ['local directory', 'GCS (test double)'] as const) {
  describe(`BuildStore over a ${kind} bucket`, () => {
    function bucket(): StorageBackend {
      return kind === 'local directory'
        ? new LocalBackend(path.join(work, 'bucket'))
        : new GcsBackend({ bucket: `b-${path.basename(work)}`, apiEndpoint: double.endpoint, maxRetryDelayMs: 1000 });
    }

    it('reads a pause chain from local builds at once, uploads it, and reads it back from the bucket', async () => {
      const backend = bucket();
      const baseId = newBuildId();
      const baseData = bytes(SIZE, 1);
      const baseFile = path.join(work, 'base.ext4');
      await writeFile(baseFile, baseData);
      await backend.upload(`${baseId}/rootfs.ext4`, baseFile);

      const node = makeStore(backend);
      const flat = Buffer.from(baseData);
      // a plain base build without a header: one mapping [0, size) → itself
      const base = await node.store.readHeader(baseId, 'rootfs.ext4');
      expect(base.mappings).toEqual(baseMappings(SIZE, baseId));
      expect((await readAll(node.store, baseId)).equals(flat)).toBe(true);

      const g1 = await pauseLocally(node.store, base, [0, 1, 2, 40], flat, 1);
      const g2 = await pauseLocally(node.store, g1.header, [2, 3, 63], flat, 2);
      // readable before any upload
      expect(node.store.isLocal(g2.id)).toBe(true);
      expect((await readAll(node.store, g2.id)).equals(flat)).toBe(true);
      expect(await node.store.fetchSnapfile(g2.id)).toBe(path.join(g2.dir, 'snapfile'));

      const progress: string[] = [];
      await node.store.uploadBuild(g1.id, { onProgress: (p) => progress.push(p.file) });
      await node.store.uploadBuild(g2.id);
      expect(node.store.uploadState(g2.id)).toEqual({ state: 'done', bytes: expect.any(Number) });
      expect(progress).toContain('rootfs.ext4.header');
      expect(progress.indexOf('rootfs.ext4')).toBeLessThan(progress.indexOf('rootfs.ext4.header'));
      expect(await backend.list(`${g2.id}/`)).toEqual([
        `${g2.id}/rootfs.ext4`,
        `${g2.id}/rootfs.ext4.header`,
        `${g2.id}/snapfile`,
      ]);
      expect(await backend.read(`${g2.id}/rootfs.ext4.header`)).toEqual(encodeHeader(g2.header));
      await node.close();

      // another node: nothing local, everything through the build cache
      const other = makeStore(backend);
      expect(other.store.isLocal(g2.id)).toBe(false);
      expect((await readAll(other.store, g2.id)).equals(flat)).toBe(true);
      expect(
        other.store
          .listCachedBuilds()
          .map((b) => b.buildId)
          .sort(),
      ).toEqual([baseId, g1.id, g2.id].sort());
      const snap = await other.store.fetchSnapfile(g2.id);
      expect((await readFile(snap)).toString()).toBe(`snapfile of ${g2.id}`);
      const cacheDir = path.join(work, 'cache');
      expect((await readdir(cacheDir)).length).toBe(3);
      await other.close();
      expect(await readdir(cacheDir)).toEqual([]);
    });

    it('says which build is missing', async () => {
      const node = makeStore(bucket());
      const id = newBuildId();
      await expect(node.store.openBuildFile(id, 'memfile')).rejects.toSatisfy(
        (e) => e instanceof BuildNotFound && e.buildId === id && e.message.includes(`${id}/memfile`),
      );
      await expect(node.store.fetchSnapfile(id)).rejects.toBeInstanceOf(BuildNotFound);
      await node.close();
    });
  });
}

/** A bucket whose uploads fail transiently `failures` times, then work. */
class FlakyUploads extends LocalBackend {
  constructor(
    root: string,
    public failures: number,
  ) {
    super(root);
  }
  override async upload(objectPath: string, localFile: string, options?: UploadOptions): Promise<void> {
    if (this.failures > 0) {
      this.failures--;
      throw new StorageUnavailable('upload', objectPath, new Error('503 from the bucket'));
    }
    return super.upload(objectPath, localFile, options);
  }
}

describe('BuildStore uploads', () => {
  it('retries a transient upload failure, and reports one that outlasts the retries', async () => {
    const backend = new FlakyUploads(path.join(work, 'bucket'), 2);
    const events: UploadEvent[] = [];
    const node = makeStore(backend, { onUploadEvent: (e) => events.push(e) });
    const id = newBuildId();
    const dir = path.join(work, id);
    await mkdir(dir);
    await writeFile(path.join(dir, 'memfile'), bytes(BLOCK, 3));
    node.store.registerLocalBuild(id, dir);
    await node.store.uploadBuild(id);
    expect(events.filter((e) => e.kind === 'retry').length).toBe(2);
    expect(await backend.read(`${id}/memfile`)).toEqual(bytes(BLOCK, 3));

    const id2 = newBuildId();
    const dir2 = path.join(work, id2);
    await mkdir(dir2);
    await writeFile(path.join(dir2, 'memfile'), bytes(BLOCK, 4));
    node.store.registerLocalBuild(id2, dir2);
    backend.failures = 100;
    node.store.startUpload(id2, { retries: 3 });
    await expect(node.store.uploadBuild(id2)).rejects.toSatisfy(
      (e) => e instanceof UploadFailed && e.attempts === 4 && e.objectPath === `${id2}/memfile`,
    );
    expect(node.store.uploadState(id2)).toMatchObject({ state: 'failed' });
    expect(events.at(-1)).toMatchObject({ kind: 'failed', buildId: id2 });
    // the local copy stays readable after a failed upload
    const { file } = await node.store.openBuildFile(id2, 'memfile');
    const out = Buffer.alloc(BLOCK);
    await file.readAt(out, 0);
    expect(out.equals(bytes(BLOCK, 4))).toBe(true);
    await node.close();
  });

  it('releases every fd it opened', async () => {
    const fdsBefore = (await readdir('/proc/self/fd')).length;
    const backend = new LocalBackend(path.join(work, 'bucket'));
    const id = newBuildId();
    await backend.write(`${id}/memfile`, bytes(3 * BLOCK, 5));
    const node = makeStore(backend);
    const { file } = await node.store.openBuildFile(id, 'memfile');
    await file.readAt(Buffer.alloc(10), 5000);
    const localId = newBuildId();
    const dir = path.join(work, localId);
    await mkdir(dir);
    await writeFile(path.join(dir, 'memfile'), bytes(BLOCK, 6));
    node.store.registerLocalBuild(localId, dir);
    await (await node.store.dataFile(localId, 'memfile')).readAt(Buffer.alloc(10), 0);
    expect((await readdir('/proc/self/fd')).length).toBeGreaterThan(fdsBefore);
    await node.close();
    expect((await readdir('/proc/self/fd')).length).toBe(fdsBefore);
  });
});
