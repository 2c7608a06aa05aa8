import { describe, expect, it } from 'vitest';
import { Placement } from './instance-placement.js';

describe('Placement', () => {
  it('puts each sandbox on the least loaded instance and keeps it there', () => {
    const p = new Placement(['a', 'b']);
    expect(['s1', 's2', 's3', 's4'].map((id) => p.place(id))).toEqual(['a', 'b', 'a', 'b']);
    expect(p.place('s1')).toBe('a');
    expect(p.of('s4')).toBe('b');
    p.forget('s2');
    p.forget('s4');
    expect(p.counts()).toEqual([2, 0]);
    expect(p.place('s5')).toBe('b');
  });

  it('learns placements found on the instances after a restart', () => {
    const p = new Placement(['a', 'b', 'c']);
    p.learn('old', 2);
    expect(p.of('old')).toBe('c');
    expect(p.place('new')).toBe('a');
  });
});
