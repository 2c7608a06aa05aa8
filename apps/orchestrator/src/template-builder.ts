import { execFile } from 'node:child_process';
import { mkdir, open, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { HEADER_VERSION, NIL_UUID, type BuildMapping, type BuildStore, type Header } from '#storage';
import type { Logger } from '#logging';
import type { SlotProvider } from './node-services.js';
import type { TemplateCatalogue, TemplateEntry } from './template-catalogue.js';
import type { VmmLauncher } from './vmm-launcher.js';

const run = promisify(execFile);
const PAGE = 4096;

export interface TemplateBuildRequest {
  templateId: string;
  /** An ext4 image to use as the rootfs; without one a blank ext4 of `rootfsMb` is made. */
  rootfsPath?: string;
  rootfsMb: number;
  memoryMb: number;
  vcpu: number;
  buildId?: string;
  /** Told at each step (and during the rootfs copy) so a caller can show progress. */
  onProgress?: (progress: TemplateBuildProgress) => void;
  /** Aborts between steps (the caller went away); the staging build is discarded. */
  signal?: AbortSignal;
}

export const TEMPLATE_BUILD_STEPS = ['rootfs', 'boot', 'snapshot', 'build'] as const;
export type TemplateBuildStep = (typeof TEMPLATE_BUILD_STEPS)[number];

export interface TemplateBuildProgress {
  step: TemplateBuildStep;
  /** Bytes for `rootfs`; 0 then 1 for the others. */
  done: number;
  total: number;
  message: string;
}

export interface TemplateBuilderOptions {
  builds: BuildStore;
  templates: TemplateCatalogue;
  vmm: VmmLauncher;
  /**
   * net-agent: the build VM boots in a slot with its NIC on the slot's tap, so the snapfile
   * records the NIC every sandbox restored from it gets (Firecracker restores NICs by tap name).
   */
  slots: SlotProvider;
  /** Real kernel for Firecracker; the VMM double takes any path. */
  kernelPath: string | undefined;
  vmRootfsDir: string;
  /** Scratch space: API socket and VMM logs of the build VM. */
  workDir: string;
  logger: Logger;
}

/**
 * Makes a template build by cold-booting the VMM through Firecracker's API (boot source,
 * machine config, rootfs drive, InstanceStart), pausing it and taking a Full snapshot. The
 * drive is given at `{vmRootfsDir}/{buildId}/rootfs.ext4` (a symlink in the VMM's private
 * mount namespace), the path every sandbox started from this build later gets its own device at.
 */
export async function buildTemplate(o: TemplateBuilderOptions, req: TemplateBuildRequest): Promise<TemplateEntry> {
  const buildId = req.buildId ?? crypto.randomUUID();
  const log = o.logger.child({ templateId: req.templateId, buildId });
  const staging = await o.builds.stageBuild(buildId);
  const work = join(o.workDir, `template-${buildId.slice(0, 8)}`);
  await mkdir(work, { recursive: true });
  let vmm;
  const slot = await o.slots.acquire(`template-${buildId.slice(0, 8)}`);
  const tell = (step: TemplateBuildStep, done: number, total: number, message: string) => {
    req.signal?.throwIfAborted();
    req.onProgress?.({ step, done, total, message });
  };
  try {
    const rootfs = join(staging, 'rootfs.ext4');
    if (req.rootfsPath)
      await copyWithProgress(req.rootfsPath, rootfs, (done, total) => tell('rootfs', done, total, ''));
    else {
      tell('rootfs', 0, 1, `mkfs.ext4 ${req.rootfsMb} MiB`);
      await makeExt4(rootfs, req.rootfsMb);
    }
    tell('boot', 0, 1, `cold boot: ${req.vcpu} vCPU, ${req.memoryMb} MiB`);
    let kernel = o.kernelPath;
    if (!kernel) {
      kernel = join(work, 'no-kernel');
      await writeFile(kernel, '');
    }
    vmm = await o.vmm.launch(
      {
        sandboxId: `template-${req.templateId}`,
        apiSocket: join(work, 'api.sock'),
        rootfsLinkPath: join(o.vmRootfsDir, buildId, 'rootfs.ext4'),
        rootfsTarget: rootfs,
        namespace: slot.namespace,
        stdoutPath: join(work, 'vmm.stdout.log'),
        stderrPath: join(work, 'vmm.stderr.log'),
      },
      log,
    );
    await vmm.api.coldBoot({
      kernelImagePath: kernel,
      bootArgs: 'console=ttyS0 reboot=k panic=1 pci=off',
      vcpuCount: req.vcpu,
      memSizeMib: req.memoryMb,
      rootfsPath: join(o.vmRootfsDir, buildId, 'rootfs.ext4'),
      tapName: slot.tapName,
    });
    tell('snapshot', 0, 1, 'pause, Full snapshot');
    await vmm.api.setState('Paused');
    await vmm.api.createSnapshot({
      type: 'Full',
      snapshotPath: join(staging, 'snapfile'),
      memFilePath: join(staging, 'memfile'),
    });
    await vmm.kill();
    vmm = undefined;
    tell('build', 0, 1, 'memfile header, commit, upload to the bucket');
    const memSize = (await stat(join(staging, 'memfile'))).size;
    const rootfsBytes = (await stat(rootfs)).size;
    // The rootfs of a template is a plain base build: no header (readers use baseHeader).
    await o.builds.commitBuild(buildId, { memfile: await memfileHeader(join(staging, 'memfile'), memSize, buildId) });
    await o.builds.uploadBuild(buildId);
    const entry: TemplateEntry = {
      templateId: req.templateId,
      buildId,
      createdAt: new Date().toISOString(),
      rootfsBytes,
      memoryBytes: memSize,
    };
    await o.templates.set(entry);
    req.onProgress?.({ step: 'build', done: 1, total: 1, message: 'done' });
    log.info({ rootfsBytes: entry.rootfsBytes, memoryBytes: memSize }, 'template built');
    return entry;
  } catch (err) {
    await o.builds.discardBuild(buildId).catch(() => undefined);
    throw err;
  } finally {
    await vmm?.kill().catch(() => undefined);
    await o.slots.release(slot, true).catch(() => undefined);
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * Copies in 4 MiB pieces, reporting bytes done (the rootfs can be gigabytes); all-zero pieces
 * are left as holes, so a mostly empty image stays sparse.
 */
async function copyWithProgress(from: string, to: string, progress: (done: number, total: number) => void) {
  const src = await open(from, 'r');
  try {
    const total = (await src.stat()).size;
    const dst = await open(to, 'w');
    try {
      const buf = Buffer.alloc(4 * 1024 * 1024);
      const zeros = Buffer.alloc(buf.length);
      await dst.truncate(total);
      progress(0, total);
      for (let done = 0; done < total;) {
        const { bytesRead } = await src.read(buf, 0, Math.min(buf.length, total - done), done);
        if (bytesRead === 0) throw new Error(`${from} shrank while being copied (${done} of ${total} bytes)`);
        if (!buf.subarray(0, bytesRead).equals(zeros.subarray(0, bytesRead))) await dst.write(buf, 0, bytesRead, done);
        done += bytesRead;
        progress(done, total);
      }
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
  }
}

async function makeExt4(path: string, sizeMb: number): Promise<void> {
  const fh = await open(path, 'w');
  await fh.truncate(sizeMb * 1024 * 1024);
  await fh.close();
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-L', 'sbx-rootfs', path]);
}

/**
 * Base memfile header: long runs of zero pages (≥ MIN_ZERO_RUN) map to the nil UUID, the rest
 * to the file itself in place. Short zero runs stay mapped: each mapping is a segment readers
 * keep (uffd-server maps one per segment), and a boot image alternates zero and data often.
 */
const MIN_ZERO_RUN = 2 * 1024 * 1024;

export async function memfileHeader(path: string, size: number, buildId: string): Promise<Header> {
  const fh = await open(path, 'r');
  const runs: { offset: number; length: number; zero: boolean }[] = [];
  try {
    const chunk = Buffer.alloc(256 * PAGE);
    for (let offset = 0; offset < size; offset += chunk.length) {
      const n = Math.min(chunk.length, size - offset);
      await fh.read(chunk, 0, n, offset);
      for (let p = 0; p < n; p += PAGE) {
        const at = offset + p;
        const len = Math.min(PAGE, size - at);
        const zero = isZero(chunk.subarray(p, p + len));
        const prev = runs[runs.length - 1];
        if (prev && prev.zero === zero) prev.length += len;
        else runs.push({ offset: at, length: len, zero });
      }
    }
  } finally {
    await fh.close();
  }
  const mappings: BuildMapping[] = [];
  for (const run of runs) {
    const zero = run.zero && run.length >= MIN_ZERO_RUN;
    const id = zero ? NIL_UUID : buildId;
    const prev = mappings[mappings.length - 1];
    if (prev && prev.buildId === id) prev.length += run.length;
    else
      mappings.push({ offset: run.offset, length: run.length, buildId: id, buildStorageOffset: zero ? 0 : run.offset });
  }
  return {
    metadata: { version: HEADER_VERSION, blockSize: PAGE, size, generation: 0, buildId, baseBuildId: buildId },
    mappings,
  };
}

function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i += 8) {
    if (i + 8 <= buf.length ? buf.readBigUInt64LE(i) !== 0n : buf.subarray(i).some((b) => b !== 0)) return false;
  }
  return true;
}
