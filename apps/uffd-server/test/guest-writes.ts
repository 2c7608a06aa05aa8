/**
 * The uffd-peer's write pattern (xorshift64 from `seed | 1`, one byte per step), so a test can
 * apply the same writes to its model of guest memory.
 */
export function peerPattern(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = BigInt(seed) | 1n;
  const mask = (1n << 64n) - 1n;
  for (let i = 0; i < length; i++) {
    x ^= (x << 13n) & mask;
    x ^= x >> 7n;
    x ^= (x << 17n) & mask;
    out[i] = Number(x & 0xffn);
  }
  return out;
}
