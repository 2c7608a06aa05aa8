import { openSync, closeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { close, eventfd, eventfdSignal, poll, POLLIN, read } from './fd.js';
import { copyFromAddress, copyToAddress, mapAnonymous, memoryView, munmap } from './memory.js';
import { PageCategory, pagemapScan, PM_SCAN_CHECK_WPASYNC } from './pagemap-scan.js';
import {
  kernelUffdFeatures,
  readUffdMessages,
  uffdApi,
  uffdCopy,
  uffdCopyFrom,
  UffdFeature,
  uffdFeaturesOfFd,
  uffdRegister,
  uffdUnregister,
  uffdWake,
  uffdWriteProtect,
  uffdZeropage,
  userfaultfd,
  UFFDIO_COPY_MODE_WP,
  UFFDIO_REGISTER_MODE_MISSING,
  UFFDIO_REGISTER_MODE_WP,
} from './userfaultfd.js';

const PAGE = 4096;
const features = kernelUffdFeatures();
const hasWpAsync = (features & UffdFeature.WP_ASYNC) !== 0;
if (!hasWpAsync) console.warn('kernel offers no UFFD_FEATURE_WP_ASYNC: the PAGEMAP_SCAN test is skipped');

describe('userfaultfd ioctls on this kernel (no faults are taken in-process)', () => {
  it('negotiates features and shows them in fdinfo', () => {
    const fd = userfaultfd();
    const api = uffdApi(fd, UffdFeature.PAGEFAULT_FLAG_WP);
    expect(api.features & UffdFeature.PAGEFAULT_FLAG_WP).not.toBe(0);
    expect(uffdFeaturesOfFd(fd) & UffdFeature.PAGEFAULT_FLAG_WP).not.toBe(0);
    expect(() => uffdApi(fd, 0)).toThrow(/UFFDIO_API failed/);
    close(fd);
  });

  it('copies, zero-fills, reports EEXIST, wakes and unregisters', () => {
    const fd = userfaultfd();
    uffdApi(fd, 0);
    const len = 16 * PAGE;
    const addr = mapAnonymous(len);
    const src = mapAnonymous(len);
    copyToAddress(src, Buffer.from('page zero'));
    uffdRegister(fd, addr, len, UFFDIO_REGISTER_MODE_MISSING);
    expect(uffdCopy(fd, addr, src, PAGE)).toBe(PAGE);
    expect(uffdCopy(fd, addr, src, PAGE)).toBe('EEXIST');
    // partial: pages 0 present, copy 0..3 returns EEXIST at once; copy 1..3 succeeds
    expect(uffdCopy(fd, addr + PAGE, src, 2 * PAGE)).toBe(2 * PAGE);
    expect(uffdCopyFrom(fd, addr + 3 * PAGE, Buffer.alloc(PAGE, 0x5a))).toBe(PAGE);
    expect(uffdZeropage(fd, addr + 4 * PAGE, PAGE)).toBe(PAGE);
    uffdWake(fd, addr, len);
    const out = Buffer.alloc(9);
    copyFromAddress(out, addr);
    expect(out.toString()).toBe('page zero');
    expect(memoryView(addr + 3 * PAGE, 4)[3]).toBe(0x5a);
    expect(memoryView(addr + 4 * PAGE, 4)[0]).toBe(0);
    // nothing pending: the fd reads nothing
    expect(readUffdMessages(fd, new Uint8Array(64))).toBe(0);
    uffdUnregister(fd, addr, len);
    // unregistered: touching page 10 no longer faults to us
    expect(memoryView(addr + 10 * PAGE, 1)[0]).toBe(0);
    munmap(addr, len);
    munmap(src, len);
    close(fd);
  });

  it.skipIf(!hasWpAsync)('tracks writes with async write-protect and finds them with PAGEMAP_SCAN', () => {
    const fd = userfaultfd();
    uffdApi(fd, UffdFeature.PAGEFAULT_FLAG_WP | UffdFeature.WP_ASYNC);
    const pages = 32;
    const addr = mapAnonymous(pages * PAGE);
    const src = mapAnonymous(pages * PAGE);
    uffdRegister(fd, addr, pages * PAGE, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
    expect(uffdCopy(fd, addr, src, pages * PAGE, UFFDIO_COPY_MODE_WP)).toBe(pages * PAGE);
    const view = memoryView(addr, pages * PAGE);
    for (const p of [3, 4, 17]) view[p * PAGE + 5] = 1; // the kernel lifts the protection itself
    const pagemap = openSync('/proc/self/pagemap', 'r');
    const written = pagemapScan(pagemap, addr, addr + pages * PAGE, {
      flags: PM_SCAN_CHECK_WPASYNC,
      categoryMask: PageCategory.WRITTEN,
      returnMask: PageCategory.WRITTEN,
    });
    expect(written.map((r) => [(r.start - addr) / PAGE, (r.end - addr) / PAGE])).toEqual([
      [3, 5],
      [17, 18],
    ]);
    // re-arm: protect again, then nothing counts as written
    uffdWriteProtect(fd, addr, pages * PAGE, true);
    const after = pagemapScan(pagemap, addr, addr + pages * PAGE, {
      flags: PM_SCAN_CHECK_WPASYNC,
      categoryMask: PageCategory.WRITTEN,
      returnMask: PageCategory.WRITTEN,
    });
    expect(after).toEqual([]);
    closeSync(pagemap);
    munmap(addr, pages * PAGE);
    munmap(src, pages * PAGE);
    close(fd);
  });

  it('eventfd wakes poll', () => {
    const efd = eventfd();
    expect(poll([{ fd: efd, events: POLLIN }], 0)[0]).toBe(0);
    eventfdSignal(efd);
    expect(poll([{ fd: efd, events: POLLIN }], 0)[0]! & POLLIN).toBe(POLLIN);
    expect(read(efd, new Uint8Array(8))).toBe(8);
    close(efd);
  });
});
