import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { newBuildId } from '../src/build-id.js';
import { BuildStore, UPLOAD_ORDER, type BuildStoreOptions, type UploadEvent } from '../src/build-store.js';
import { GcsBackend } from '../src/gcs-backend.js';
import { encodeHeader, type Header } from '../src/header-codec.js';
import { LocalBackend } from '../src/local-backend.js';
import { baseMappings, createMappings, mergeMappings } from '../src/mappings.js';
import type { StorageBackend, UploadOptions } from '../src/storage-backend.js';
import { BuildNotFound, PrefetchInvalid, StorageUnavailable, UploadFailed } from '../src/storage-errors.js';
import { PREFETCH_FILE, type PrefetchSet } from '../src/prefetch-codec.js';
import { FakeGcsServer } from '../../test-peers/src/fake-gcs-server.js';

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

// fake-gcs-server: a test peer, built by scripts/test-peers.sh on first use.
let fakeGcs: FakeGcsServer;
beforeAll(async () => {
  fakeGcs = await FakeGcsServer.start();
}, 1_800_000);
afterAll(async () => {
  await fakeGcs.stop();
});

/** A store of one process of a node: `node` names the node's cache directory, `owner` the process. */
function makeStore(
  backend: StorageBackend | undefined,
  node = 'node',
  owner = 'p',
  extra: Partial<BuildStoreOptions> = {},
) {
  return new BuildStore({
    ...(backend ? { backend } : {}),
    cacheDir: path.join(work, node),
    owner,
    cache: { deleteDelayMs: 10, checkIntervalMs: 3_600_000 },
    chunkSize: 64 * 1024,
    uploadRetry: { attempts: 3, initialDelayMs: 1, maxDelayMs: 5, multiplier: 2 },
    ...extra,
  });
}

/** Pauses a sandbox on this node: the diff of `dirty` blocks and the merged header, written as the orchestrator does. */
async function pauseLocally(store: BuildStore, parent: Header, dirty: number[], flat: Buffer, seed: number) {
  const id = newBuildId();
  const dir = await store.stageBuild(id);
  const pieces = dirty.map((b, i) => {
    const data = bytes(BLOCK, seed * 1000 + i);
    data.copy(flat, b * BLOCK);
    return data;
  });
  await writeFile(path.join(dir, 'rootfs.ext4'), Buffer.concat(pieces));
  await writeFile(path.join(dir, 'snapfile'), `snapfile of ${id}`);
  await BuildStore.writePrefetch(path.join(dir, PREFETCH_FILE), prefetchOf(dirty));
  const header: Header = {
    metadata: { ...parent.metadata, generation: parent.metadata.generation + 1, buildId: id },
    mappings: mergeMappings(parent.mappings, createMappings(dirty, BLOCK, id)),
  };
  await store.commitBuild(id, { 'rootfs.ext4': header });
  return { id, header };
}

/** The recorded prefetch set a pause of `dirty` stores with its build (here: the dirty blocks backwards). */
function prefetchOf(dirty: number[]): PrefetchSet {
  return { blockSize: BLOCK, size: SIZE, blocks: [...dirty].reverse() };
}

async function readAll(store: BuildStore, id: string): Promise<Buffer> {
  const { file } = await store.openBuildFile(id, 'rootfs.ext4');
  const out = Buffer.alloc(file.size);
  await file.readAt(out, 0);
  await file.close();
  return out;
}

for (const kind of ['local directory', 'GCS (fake-gcs-server)'] as const) {
  describe(`BuildStore over a ${kind} bucket`, () => {
    let n = 0;
    async function bucket(): Promise<StorageBackend> {
      if (kind === 'local directory') return new LocalBackend(path.join(work, 'bucket'));
      const name = `b-${process.pid}-${++n}`;
      await fakeGcs.createBucket(name);
      return new GcsBackend({ bucket: name, apiEndpoint: fakeGcs.endpoint, maxRetryDelayMs: 1000 });
    }

    it('a pause chain is read by every process of the node at once, uploaded in order, and read back from the bucket', async () => {
      const backend = await bucket();
      const baseId = newBuildId();
      const baseData = bytes(SIZE, 1);
      await writeFile(path.join(work, 'base.ext4'), baseData);
      await backend.upload(`${baseId}/rootfs.ext4`, path.join(work, 'base.ext4'));

      const events: UploadEvent[] = [];
      const writer = makeStore(backend, 'node', 'orchestrator', { onUploadEvent: (e) => events.push(e) });
      const flat = Buffer.from(baseData);
      // a plain base build without a header: one mapping [0, size) → itself
      const base = await writer.readHeader(baseId, 'rootfs.ext4');
      expect(base.mappings).toEqual(baseMappings(SIZE, baseId));
      expect(base.metadata.version).toBe(3);
      const g1 = await pauseLocally(writer, base, [0, 1, 2, 40], flat, 1);
      const g2 = await pauseLocally(writer, g1.header, [2, 3, 63], flat, 2);

      // another process of the same node (block-server, uffd-server) reads it before any upload
      const reader = makeStore(backend, 'node', 'block-server');
      expect((await readAll(reader, g2.id)).equals(flat)).toBe(true);
      expect(await reader.fetchSnapfile(g2.id)).toBe(path.join(writer.localDir(g2.id), 'snapfile'));
      expect(
        (await reader.listCachedBuilds())
          .filter((b) => b.local)
          .map((b) => b.buildId)
          .sort(),
      ).toEqual([g1.id, g2.id].sort());

      // g2's upload waits for its parent's
      const uploads = [writer.uploadBuild(g2.id), writer.uploadBuild(g1.id)];
      await Promise.all(uploads);
      expect(writer.uploadState(g2.id)).toEqual({ state: 'done', bytes: expect.any(Number) });
      const finished = events.filter((e) => e.kind === 'done').map((e) => e.buildId);
      expect(finished).toEqual([g1.id, g2.id]);
      const order = events
        .filter((e) => e.kind === 'progress' && e.buildId === g2.id)
        .map((e) => (e as { file: string }).file);
      expect([...new Set(order)]).toEqual(UPLOAD_ORDER.filter((f) => f !== 'memfile' && f !== 'memfile.header'));
      expect(await backend.read(`${g2.id}/rootfs.ext4.header`)).toEqual(encodeHeader(g2.header));
      expect(await reader.readPrefetch(g2.id)).toEqual(prefetchOf([2, 3, 63]));
      await reader.close();
      await writer.close();

      // another node: nothing local, everything through its build cache
      const other = makeStore(backend, 'other', 'block-server');
      expect((await readAll(other, g2.id)).equals(flat)).toBe(true);
      expect((await other.listCachedBuilds()).map((b) => b.buildId).sort()).toEqual([baseId, g1.id, g2.id].sort());
      expect((await readFile(await other.fetchSnapfile(g2.id))).toString()).toBe(`snapfile of ${g2.id}`);
      expect(await other.readHeader(g2.id, 'rootfs.ext4')).toEqual(g2.header);
      // the recorded prefetch set travels with the build; a build without one has none
      expect(await other.readPrefetch(g2.id)).toEqual(prefetchOf([2, 3, 63]));
      expect(await other.readPrefetch(baseId)).toBeUndefined();
      const cacheDir = path.join(work, 'other', 'remote', 'block-server');
      expect((await readdir(cacheDir)).length).toBe(3);
      await other.close();
      expect(await readdir(cacheDir)).toEqual([]);
    });

    it('a corrupt or truncated prefetch set is PrefetchInvalid, locally and from the bucket; the build still reads', async () => {
      const backend = await bucket();
      const writer = makeStore(backend, 'node', 'orchestrator');
      const baseId = newBuildId();
      await writeFile(path.join(work, 'base.ext4'), bytes(SIZE, 5));
      await backend.upload(`${baseId}/rootfs.ext4`, path.join(work, 'base.ext4'));
      const flat = bytes(SIZE, 5);
      const g1 = await pauseLocally(writer, await writer.readHeader(baseId, 'rootfs.ext4'), [4, 5], flat, 3);
      const file = path.join(writer.localDir(g1.id), PREFETCH_FILE);
      const good = await readFile(file);
      await writeFile(file, good.subarray(0, good.length - 2));
      await expect(writer.readPrefetch(g1.id)).rejects.toSatisfy(
        (e) => e instanceof PrefetchInvalid && /truncated/.test(e.message),
      );
      const flipped = Buffer.from(good);
      flipped[good.length - 1]! ^= 0x40;
      await writeFile(file, flipped);
      await writer.uploadBuild(g1.id);
      const other = makeStore(backend, 'other', 'uffd-server');
      await expect(other.readPrefetch(g1.id)).rejects.toSatisfy(
        (e) => e instanceof PrefetchInvalid && /checksum/.test(e.message),
      );
      expect((await readAll(other, g1.id)).equals(flat)).toBe(true);
      await other.close();
      await writer.close();
    });

    it('says which build is missing', async () => {
      const store = makeStore(await bucket());
      const id = newBuildId();
      await expect(store.openBuildFile(id, 'memfile')).rejects.toSatisfy(
        (e) => e instanceof BuildNotFound && e.buildId === id && e.message.includes(`${id}/memfile`),
      );
      await expect(store.resolveSnapshot(id)).rejects.toBeInstanceOf(BuildNotFound);
      expect(await store.exists(id)).toBe(false);
      await store.close();
    });
  });
}

describe('BuildStore local builds', () => {
  /** A build committed on this node under `id`; `size` tells its versions apart. */
  async function commitLocal(store: BuildStore, id: string, size: number): Promise<Header> {
    const dir = await store.stageBuild(id);
    await writeFile(path.join(dir, 'memfile'), bytes(size, 1));
    await writeFile(path.join(dir, 'rootfs.ext4'), bytes(size, 2));
    await writeFile(path.join(dir, 'snapfile'), `snapfile of ${id} (${size})`);
    const header: Header = {
      metadata: { version: 3, blockSize: BLOCK, size, generation: 0, buildId: id, baseBuildId: id },
      mappings: baseMappings(size, id),
    };
    await store.commitBuild(id, { memfile: header, 'rootfs.ext4': header });
    return header;
  }

  it('a resolved build whose files are removed is BuildNotFound; committed again under its id, its new headers are read', async () => {
    const store = makeStore(undefined);
    const id = newBuildId();
    const first = await commitLocal(store, id, SIZE);
    const resolved = await store.resolveSnapshot(id);
    expect(resolved.memfileHeader).toEqual(first);
    expect(resolved.rootfsHeader).toEqual(first);
    expect(await store.resolveSnapshot(id)).toEqual(resolved);
    expect((await store.openBuildFile(id, 'rootfs.ext4')).header).toEqual(first);

    await rm(store.localDir(id), { recursive: true });
    await expect(store.resolveSnapshot(id)).rejects.toSatisfy((e) => e instanceof BuildNotFound && e.buildId === id);
    await expect(store.readHeader(id, 'memfile')).rejects.toBeInstanceOf(BuildNotFound);

    const second = await commitLocal(store, id, 2 * SIZE);
    const again = await store.resolveSnapshot(id);
    expect(again.memfileHeader).toEqual(second);
    expect(again.rootfsHeader.metadata.size).toBe(2 * SIZE);
    expect((await store.openBuildFile(id, 'memfile')).header).toEqual(second);
    await store.close();
  });
});

/** A bucket whose uploads fail transiently `failures` times, or wait for `gate` before the snapfile. */
class TestBucket extends LocalBackend {
  failures = 0;
  gate: Promise<void> | undefined;
  override async upload(objectPath: string, localFile: string, options?: UploadOptions): Promise<void> {
    if (this.failures > 0) {
      this.failures--;
      throw new StorageUnavailable('upload', objectPath, new Error('503 from the bucket'));
    }
    if (objectPath.endsWith('/snapfile')) await this.gate;
    return super.upload(objectPath, localFile, options);
  }
}

describe('BuildStore uploads', () => {
  it('a build is complete in the bucket only once its snapfile, uploaded last, is there', async () => {
    const backend = new TestBucket(path.join(work, 'bucket'));
    let open!: () => void;
    backend.gate = new Promise((resolve) => (open = resolve));
    const writer = makeStore(backend);
    const id = newBuildId();
    const dir = await writer.stageBuild(id);
    await writeFile(path.join(dir, 'memfile'), bytes(2 * BLOCK, 7));
    await writeFile(path.join(dir, 'snapfile'), 'snap');
    await writer.commitBuild(id, {
      memfile: {
        metadata: { version: 3, blockSize: BLOCK, size: 2 * BLOCK, generation: 0, buildId: id, baseBuildId: id },
        mappings: baseMappings(2 * BLOCK, id),
      },
    });
    const upload = writer.uploadBuild(id);
    const elsewhere = makeStore(backend, 'other');
    await eventually(() => backend.exists(`${id}/memfile.header`), { intervalMs: 5 });
    // data and headers are there, the snapfile is not: another node does not take the build
    expect(await elsewhere.exists(id)).toBe(false);
    await expect(elsewhere.resolveSnapshot(id)).rejects.toBeInstanceOf(BuildNotFound);
    open();
    await upload;
    expect(await elsewhere.exists(id)).toBe(true);
    await writer.close();
    await elsewhere.close();
  });

  it('retries a transient upload failure, and reports one that outlasts the retries', async () => {
    const backend = new TestBucket(path.join(work, 'bucket'));
    backend.failures = 2;
    const events: UploadEvent[] = [];
    const store = makeStore(backend, 'node', 'p', { onUploadEvent: (e) => events.push(e) });
    const id = newBuildId();
    await writeFile(path.join(await store.stageBuild(id), 'memfile'), bytes(BLOCK, 3));
    await store.commitBuild(id, {});
    await store.uploadBuild(id);
    expect(events.filter((e) => e.kind === 'retry').length).toBe(2);
    expect(await backend.read(`${id}/memfile`)).toEqual(bytes(BLOCK, 3));

    const id2 = newBuildId();
    await writeFile(path.join(await store.stageBuild(id2), 'memfile'), bytes(BLOCK, 4));
    await store.commitBuild(id2, {});
    backend.failures = 100;
    store.startUpload(id2, { retries: 3 });
    await expect(store.uploadBuild(id2)).rejects.toSatisfy(
      (e) => e instanceof UploadFailed && e.attempts === 4 && e.objectPath === `${id2}/memfile`,
    );
    expect(store.uploadState(id2)).toMatchObject({ state: 'failed' });
    expect(store.uploadCounts()).toEqual({ uploading: 0, done: 1, failed: 1 });
    expect(events.at(-1)).toMatchObject({ kind: 'failed', buildId: id2 });
    // the local copy stays readable after a failed upload
    const { file } = await store.openBuildFile(id2, 'memfile');
    const out = Buffer.alloc(BLOCK);
    await file.readAt(out, 0);
    expect(out.equals(bytes(BLOCK, 4))).toBe(true);
    await store.close();
  });

  it('a discarded or crashed staging is never read, and releases every fd it opened', async () => {
    const fdsBefore = (await readdir('/proc/self/fd')).length;
    const backend = new LocalBackend(path.join(work, 'bucket'));
    const id = newBuildId();
    await backend.write(`${id}/memfile`, bytes(3 * BLOCK, 5));
    const store = makeStore(backend);
    const { file } = await store.openBuildFile(id, 'memfile');
    await file.readAt(Buffer.alloc(10), 5000);
    const localId = newBuildId();
    await writeFile(path.join(await store.stageBuild(localId), 'memfile'), bytes(BLOCK, 6));
    expect(await store.exists(localId)).toBe(false);
    await store.commitBuild(localId, {});
    await (await store.dataFile(localId, 'memfile')).readAt(Buffer.alloc(10), 0);
    const staged = newBuildId();
    await store.stageBuild(staged);
    await store.discardStaged();
    expect(await readdir(store.buildsDir)).toEqual([localId]);
    expect((await readdir('/proc/self/fd')).length).toBeGreaterThan(fdsBefore);
    await store.close();
    expect((await readdir('/proc/self/fd')).length).toBe(fdsBefore);
  });
});
