/**
 * The memory image a cold boot leaves behind. There is no guest kernel here, so "booting"
 * writes a deterministic pattern derived from the machine configuration: tests predict every
 * byte with `bootImagePage`, and a template built twice from the same configuration is the
 * same bytes. One page in four stays zero, as a real guest leaves much of its memory
 * untouched, so zero-page handling (nil mappings, UFFDIO_ZEROPAGE) gets exercised.
 */

export function bootSeed(machine: { vcpuCount: number; memSizeMib: number }): number {
  return fnv1a(`vmm-sim:${machine.vcpuCount}:${machine.memSizeMib}`);
}

/** Whether page `index` of the boot image is all zeros. */
export function bootPageIsZero(seed: number, index: number): boolean {
  return (mix(seed ^ index) & 3) === 3;
}

/** Fills `target` (one page, a multiple of 4 bytes) with page `index` of the image for `seed`. */
export function bootImagePage(seed: number, index: number, target: Uint8Array): void {
  if (bootPageIsZero(seed, index)) {
    target.fill(0);
    return;
  }
  const words = new Uint32Array(target.buffer, target.byteOffset, target.length >>> 2);
  // xorshift32 seeded per page: cheap, and every page differs from every other.
  let x = mix(seed + Math.imul(index + 1, 0x9e3779b1)) | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
}

function mix(v: number): number {
  let h = v >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}
