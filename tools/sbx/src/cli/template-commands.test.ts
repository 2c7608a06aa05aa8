import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkRootfs, main, positiveInt, templateIdFor } from './template-commands.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'sbx-tpl-cli-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('./sbx template input checks (before the node is asked)', () => {
  it('takes --name only when it is a safe id, else makes one from the rootfs file name', () => {
    expect(templateIdFor('my_tpl-1', '/x/rootfs.ext4')).toBe('my_tpl-1');
    for (const bad of ['', '../etc', 'a/b', '-x', 'a b', 'a'.repeat(64)])
      expect(() => templateIdFor(bad, '/x/r.ext4')).toThrow(/not a safe template id/);
    expect(templateIdFor(undefined, '/images/ubuntu 22.04.ext4')).toBe('ubuntu-22-04');
    expect(templateIdFor(undefined, '/images/.hidden.img')).toBe('hidden');
    expect(() => templateIdFor(undefined, '/images/....')).toThrow(/pass --name/);
  });

  it('takes sizes only as whole numbers ≥ 1', () => {
    expect(positiveInt('--vcpu', undefined)).toBeUndefined();
    expect(positiveInt('--memory-mb', '256')).toBe(256);
    for (const bad of ['0', '-1', '1.5', 'abc', '', '99999999999'])
      expect(() => positiveInt('--memory-mb', bad)).toThrow(/--memory-mb must be a whole number/);
  });

  it('needs the rootfs to exist and be a non-empty regular file, and makes its path absolute', async () => {
    await expect(checkRootfs(undefined)).rejects.toThrow(/--rootfs <ext4 image> is required/);
    await expect(checkRootfs(join(dir, 'missing.ext4'))).rejects.toThrow(/does not exist/);
    await expect(checkRootfs(dir)).rejects.toThrow(/is not a regular file/);
    await writeFile(join(dir, 'empty.ext4'), '');
    await expect(checkRootfs(join(dir, 'empty.ext4'))).rejects.toThrow(/is empty/);
    await writeFile(join(dir, 'ok.ext4'), Buffer.alloc(8192));
    const relativePath = relative(process.cwd(), join(dir, 'ok.ext4'));
    expect(await checkRootfs(relativePath)).toEqual({ path: join(dir, 'ok.ext4'), bytes: 8192 });
  });

  it('refuses bad input before dialling any node', async () => {
    const noNode = ['--data-dir', join(dir, 'no-node')];
    await expect(main(['template-typo'])).resolves.toBe(2);
    await expect(main(['create', '--rootfs', join(dir, 'missing.ext4'), ...noNode])).rejects.toThrow(/does not exist/);
    await expect(main(['create', '--rootfs', join(dir, 'ok.ext4'), '--vcpu', '0', ...noNode])).rejects.toThrow(
      /--vcpu must be/,
    );
    // Valid input gets as far as finding the node, which is not there.
    await expect(main(['create', '--rootfs', join(dir, 'ok.ext4'), ...noNode])).rejects.toThrow(/no local node/);
    await expect(main(['list', ...noNode])).rejects.toThrow(/no local node/);
  });
});
