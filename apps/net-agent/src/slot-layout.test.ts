import { describe, expect, it } from 'vitest';
import { loadNetAgentConfig } from './net-agent-config.js';
import { SlotIndexInvalid, SlotLayout } from './slot-layout.js';

const layout = new SlotLayout(loadNetAgentConfig({ argv: [], env: {} }));

describe('SlotLayout', () => {
  it('gives slot i its namespace, veth /31 and host IP', () => {
    expect(layout.slot(1)).toEqual({
      idx: 1,
      namespace: 'ns-1',
      hostVeth: 'veth-1',
      nsVeth: 'eth0',
      hostVethIp: '10.12.0.2',
      nsVethIp: '10.12.0.3',
      tapName: 'tap0',
      tapIp: '169.254.0.22',
      tapPrefix: 30,
      guestIp: '169.254.0.21',
      hostIp: '10.11.0.2',
    });
    expect(layout.slot(300)).toMatchObject({ hostVethIp: '10.12.2.88', nsVethIp: '10.12.2.89', hostIp: '10.11.1.45' });
  });

  it('never gives two slots the same address', () => {
    const seen = new Set<string>();
    for (let i = layout.first; i <= layout.last; i++) {
      const s = layout.slot(i);
      for (const ip of [s.hostIp, s.hostVethIp, s.nsVethIp]) {
        expect(seen.has(ip), ip).toBe(false);
        seen.add(ip);
      }
    }
  });

  it('maps names back to indexes only for our own names', () => {
    expect(layout.indexOfNamespace('ns-42')).toBe(42);
    expect(layout.indexOfHostVeth('veth-42')).toBe(42);
    for (const other of ['ns-', 'ns-042', 'ns-42x', 'xns-42', 'ns-0', 'ns-99999999', 'veth-a']) {
      expect(layout.indexOfNamespace(other) ?? layout.indexOfHostVeth(other), other).toBeUndefined();
    }
    expect(() => layout.slot(0)).toThrow(SlotIndexInvalid);
    expect(() => layout.slot(layout.last + 1)).toThrow(SlotIndexInvalid);
  });
});
