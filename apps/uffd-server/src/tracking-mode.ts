import { readFileSync } from 'node:fs';
import { UffdFeature, uffdFeaturesOfFd } from '#native';
import type { GuestRegion } from '#uffd';

/**
 * How the guest's writes are known (the features are fixed by whoever created the uffd):
 * - `wp-async`: pages installed write-protected, the kernel lifts the protection on write by
 *   itself (UFFD_FEATURE_WP_ASYNC) and PAGEMAP_SCAN lists the written pages: no extra faults.
 * - `wp-sync`: pages installed write-protected, each first write is a fault we answer
 *   (record + UFFDIO_WRITEPROTECT off): one extra round trip per written page.
 * - `present`: no write-protect; every page we installed counts as dirty (E2B's behaviour), so
 *   prefetch is turned off to keep the diff to pages the guest touched.
 */
export type TrackingMode = 'wp-async' | 'wp-sync' | 'present';

export interface TrackingProbe {
  mode: TrackingMode;
  features: number;
  /** Why the mode is not the best one, for the log line. */
  reason: string;
}

/** VmFlags of the VMAs of `pid` that hold each region's base (`um` missing, `uw` write-protect). */
export function regionVmFlags(pid: number, regions: readonly GuestRegion[]): Array<Set<string> | undefined> {
  const text = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  const vmas: Array<{ start: number; end: number; flags: Set<string> }> = [];
  let current: { start: number; end: number; flags: Set<string> } | undefined;
  for (const line of text.split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (head?.[1] && head[2]) {
      current = { start: parseInt(head[1], 16), end: parseInt(head[2], 16), flags: new Set() };
      vmas.push(current);
    } else if (current && line.startsWith('VmFlags:')) {
      current.flags = new Set(line.slice(8).trim().split(/\s+/));
    }
  }
  return regions.map((r) => vmas.find((v) => r.base >= v.start && r.base < v.end)?.flags);
}

export function probeTracking(uffd: number, pid: number | undefined, regions: readonly GuestRegion[]): TrackingProbe {
  const features = uffdFeaturesOfFd(uffd);
  if (!(features & UffdFeature.PAGEFAULT_FLAG_WP))
    return { mode: 'present', features, reason: 'the uffd was created without UFFD_FEATURE_PAGEFAULT_FLAG_WP' };
  if (pid === undefined || pid <= 0)
    return { mode: 'present', features, reason: 'peer pid unknown: cannot check the write-protect registration' };
  let flags: Array<Set<string> | undefined>;
  try {
    flags = regionVmFlags(pid, regions);
  } catch (err) {
    return { mode: 'present', features, reason: `cannot read /proc/${pid}/smaps: ${(err as Error).message}` };
  }
  const unprotected = flags.findIndex((f) => !f?.has('uw'));
  if (unprotected >= 0)
    return {
      mode: 'present',
      features,
      reason: `region ${unprotected} is not registered with UFFDIO_REGISTER_MODE_WP`,
    };
  if (features & UffdFeature.WP_ASYNC) return { mode: 'wp-async', features, reason: '' };
  return { mode: 'wp-sync', features, reason: 'the uffd has no UFFD_FEATURE_WP_ASYNC' };
}
