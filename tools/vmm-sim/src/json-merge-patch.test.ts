import { describe, expect, it } from 'vitest';
import { applyMergePatch } from './json-merge-patch.js';

describe('applyMergePatch (RFC 7396, used by PATCH /mmds)', () => {
  // Firecracker's own example (rpc_interface.rs test_preboot_patch_mmds) and RFC 7396 appendix A.
  it('removes keys set to null and replaces the rest', () => {
    expect(applyMergePatch({ key1: 'value1', key2: 'val2' }, { key1: null, key2: 'value2' })).toEqual({
      key2: 'value2',
    });
    expect(applyMergePatch({ a: { b: 'c' } }, { a: { b: 'd', c: null } })).toEqual({ a: { b: 'd' } });
    expect(applyMergePatch({ a: [{ b: 'c' }] }, { a: [1] })).toEqual({ a: [1] });
    expect(applyMergePatch(['a', 'b'], ['c', 'd'])).toEqual(['c', 'd']);
    expect(applyMergePatch({ a: 'foo' }, 'bar')).toBe('bar');
    expect(applyMergePatch({ e: null }, { a: 1 })).toEqual({ e: null, a: 1 });
    expect(applyMergePatch({}, { a: { bb: { ccc: null } } })).toEqual({ a: { bb: {} } });
  });
});
