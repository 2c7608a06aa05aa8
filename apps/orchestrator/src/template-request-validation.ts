import { open } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import type { CreateTemplateRequest } from '#proto/sbx/templates';
import { RequestInvalid } from './orchestrator-errors.js';
import { checkSafeName, type ResourceBounds } from './request-validation.js';

/** What a template build needs, checked: the rootfs is a regular ext4 file of whole 4 KiB blocks. */
export interface CheckedTemplateRequest {
  templateId: string;
  rootfsPath: string;
  rootfsBytes: number;
  memoryMb: number;
  vcpu: number;
  replace: boolean;
}

const BLOCK = 4096;
// ext4 superblock: 1024 bytes in, s_magic (0xEF53, little-endian) at offset 0x38 within it.
const EXT_MAGIC_OFFSET = 1024 + 0x38;
const EXT_MAGIC = 0xef53;

/**
 * Checks a CreateTemplate request before anything is taken. The rootfs path is read by the
 * orchestrator, so it is checked here (not only by the CLI): absolute, a regular file, ext2/3/4
 * magic, a whole number of 4 KiB blocks (block-server serves it in 4 KiB blocks).
 */
export async function checkCreateTemplate(
  req: CreateTemplateRequest,
  bounds: ResourceBounds,
  defaultMemoryMb: number,
): Promise<CheckedTemplateRequest> {
  const templateId = checkSafeName('template_id', req.templateId);
  const memoryMb = req.memoryMb === 0 ? defaultMemoryMb : req.memoryMb;
  if (!Number.isInteger(memoryMb) || memoryMb < bounds.minRamMb || memoryMb > bounds.maxRamMb) {
    throw new RequestInvalid('memory_mb', `${memoryMb} is outside [${bounds.minRamMb}, ${bounds.maxRamMb}]`);
  }
  const vcpu = req.vcpu === 0 ? Math.max(1, bounds.minVcpu) : req.vcpu;
  if (!Number.isInteger(vcpu) || vcpu < bounds.minVcpu || vcpu > bounds.maxVcpu) {
    throw new RequestInvalid('vcpu', `${vcpu} is outside [${bounds.minVcpu}, ${bounds.maxVcpu}]`);
  }
  const rootfsPath = req.rootfsPath;
  if (!rootfsPath) throw new RequestInvalid('rootfs_path', 'is empty');
  if (!isAbsolute(rootfsPath)) throw new RequestInvalid('rootfs_path', `'${rootfsPath}' is not an absolute path`);
  const rootfsBytes = await checkExt4Image(rootfsPath);
  return { templateId, rootfsPath, rootfsBytes, memoryMb, vcpu, replace: req.replace };
}

async function checkExt4Image(path: string): Promise<number> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === 'ENOENT' ? 'does not exist' : code === 'EACCES' ? 'is not readable' : `cannot be opened (${code})`;
    throw new RequestInvalid('rootfs_path', `'${path}' ${why} on the node`);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new RequestInvalid('rootfs_path', `'${path}' is not a regular file`);
    if (st.size === 0 || st.size % BLOCK !== 0) {
      throw new RequestInvalid('rootfs_path', `'${path}' is ${st.size} bytes, not a whole number of 4 KiB blocks`);
    }
    const magic = Buffer.alloc(2);
    const { bytesRead } = await fh.read(magic, 0, 2, EXT_MAGIC_OFFSET);
    if (bytesRead !== 2 || magic.readUInt16LE(0) !== EXT_MAGIC) {
      throw new RequestInvalid('rootfs_path', `'${path}' is not an ext4 image (no ext superblock magic)`);
    }
    return st.size;
  } finally {
    await fh.close();
  }
}
