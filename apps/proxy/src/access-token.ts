import { createHash, timingSafeEqual } from 'node:crypto';

export const TOKEN_HEADER = 'e2b-traffic-access-token';

/**
 * Constant-time check of a traffic access token: both sides are hashed first, so the compare
 * takes the same time whatever the lengths and wherever the first difference is.
 */
export function tokenMatches(expected: string, given: string): boolean {
  const a = createHash('sha256').update(expected).digest();
  const b = createHash('sha256').update(given).digest();
  return timingSafeEqual(a, b);
}
