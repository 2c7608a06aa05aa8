import { openSync, closeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { close, eventfd, eventfdSignal, poll, POLLIN, read } from './fd.js';
import { mapAnonymous, memoryView, munmap } from './memory.js';
import { PageCategory, pagemapScan, PM_SCAN_CHECK_WPASYNC } from './pagemap-scan.js';
import {
  kernelUffdFeatures,
  uffdApi,
  UffdFeature,
  uffdFeaturesOfFd,
  uffdRegister,
  uffdWriteProtect,
  userfaultfd,
  UFFDIO_REGISTER_MODE_MISSING,
  UFFDIO_REGISTER_MODE_WP,
} from './userfaultfd.js';

const PAGE = 4096;
const features = kernelUffdFeatures();
const hasWpAsync = (features & UffdFeature.WP_ASYNC) !== 0;
if (!hasWpAsync) console.warn('kernel offers no UFFD_FEATURE_WP_ASYNC: the PAGEMAP_SCAN test is skipped');

/* Faults are served by the native engine only (uffd-serve-engine.ts), tested with a peer process in test/. */
describe('userfaultfd ioctls on this kernel (no faults are taken in-process)', () => {
  it('negotiates features and shows them in fdinfo', () => {
    const fd = userfaultfd();
    const api = uffdApi(fd, UffdFeature.PAGEFAULT_FLAG_WP);
    expect(api.features & UffdFeature.PAGEFAULT_FLAG_WP).not.toBe(0);
    expect(uffdFeaturesOfFd(fd) & UffdFeature.PAGEFAULT_FLAG_WP).not.toBe(0);
    expect(() => uffdApi(fd, 0)).toThrow(/UFFDIO_API failed/);
    close(fd);
  });

  it.skipIf(!hasWpAsync)('tracks writes with async write-protect and finds them with PAGEMAP_SCAN', () => {
    const fd = userfaultfd();
    uffdApi(fd, UffdFeature.PAGEFAULT_FLAG_WP | UffdFeature.WP_ASYNC);
    const pages = 32;
    const addr = mapAnonymous(pages * PAGE);
    const view = memoryView(addr, pages * PAGE);
    // Present before registration (no fault to serve), then write-protected as the engine installs pages.
    view.fill(7);
    uffdRegister(fd, addr, pages * PAGE, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
    uffdWriteProtect(fd, addr, pages * PAGE, true);
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
