import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { close, ftruncate, pread, preadToAddress, pwriteFromAddress } from './fd.js';
import {
  copyFromAddress,
  copyToAddress,
  fillAddress,
  madvise,
  mapAnonymous,
  MADV_DONTNEED,
  MAP_SHARED,
  memfdCreate,
  memoryView,
  mmap,
  mprotect,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from './memory.js';

describe('memory bindings', () => {
  it('maps anonymous memory, copies to and from raw addresses, and drops pages with madvise', () => {
    const len = 64 * 1024;
    const addr = mapAnonymous(len);
    copyToAddress(addr + 4096, Buffer.from('hello'));
    const out = Buffer.alloc(5);
    copyFromAddress(out, addr + 4096);
    expect(out.toString()).toBe('hello');
    const view = memoryView(addr, len);
    expect(Buffer.from(view.subarray(4096, 4101)).toString()).toBe('hello');
    fillAddress(addr, 7, 10);
    expect(view[9]).toBe(7);
    madvise(addr, len, MADV_DONTNEED);
    expect(view[4096]).toBe(0);
    mprotect(addr, len, PROT_READ);
    munmap(addr, len);
  });

  it('shares a memfd between two mappings and reads/writes files at raw addresses', () => {
    const fd = memfdCreate('test');
    ftruncate(fd, 8192);
    const a = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const b = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    copyToAddress(a + 100, Buffer.from('shared'));
    const out = Buffer.alloc(6);
    copyFromAddress(out, b + 100);
    expect(out.toString()).toBe('shared');
    const viaFd = Buffer.alloc(6);
    pread(fd, viaFd, 100);
    expect(viaFd.toString()).toBe('shared');

    const dir = mkdtempSync(join(tmpdir(), 'native-mem-'));
    const path = join(dir, 'f');
    writeFileSync(path, Buffer.alloc(8192, 0x41));
    const f = openSync(path, 'r+');
    expect(preadToAddress(f, a, 8192, 0)).toBe(8192);
    copyFromAddress(out, b + 100);
    expect(out.toString()).toBe('AAAAAA');
    copyToAddress(a, Buffer.from('zz'));
    pwriteFromAddress(f, a, 2, 10);
    closeSync(f);
    expect(readFileSync(path).subarray(10, 12).toString()).toBe('zz');
    rmSync(dir, { recursive: true });
    munmap(a, 8192);
    munmap(b, 8192);
    close(fd);
  });

  it('fails with a SyscallError naming the errno', () => {
    expect(() => mmap(0, 4096, PROT_READ, MAP_SHARED, 12345, 0)).toThrow(/mmap failed: EBADF/);
  });
});
