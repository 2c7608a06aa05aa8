import { describe, expect, it } from 'vitest';
import { ConfigInvalid } from '#config';
import { loadNetAgentConfig } from './net-agent-config.js';

describe('net-agent configuration', () => {
  it('has the DESIGN §5 defaults', () => {
    const c = loadNetAgentConfig({ argv: [], env: {} });
    expect(c).toMatchObject({
      controlSocket: '/run/sbx/net-agent.sock',
      metricsPort: 9463,
      reservation: 'memory',
      namespacePrefix: 'ns-',
      hostVethPrefix: 'veth-',
      nsVethName: 'eth0',
      tapName: 'tap0',
      tapIp: '169.254.0.22',
      tapPrefix: 30,
      guestIp: '169.254.0.21',
      vethCidr: '10.12.0.0/16',
      hostCidr: '10.11.0.0/16',
      metadataAddress: '169.254.169.254',
      blockedRanges: ['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '169.254.0.0/16'],
    });
  });

  it('reads flags before env and takes CONSUL_HTTP_ADDR for Consul', () => {
    const c = loadNetAgentConfig({
      argv: ['--reservation', 'consul', '--blocked-ranges', '10.0.0.0/8', '--blocked-ranges', '100.64.0.0/10'],
      env: {
        CONSUL_HTTP_ADDR: '127.0.0.1:8500',
        SBX_NET_AGENT_TAP_NAME: 'tapx',
        SBX_NET_AGENT_ENABLE_FORWARDING: 'false',
      },
    });
    expect(c.consulAddr).toBe('127.0.0.1:8500');
    expect(c.tapName).toBe('tapx');
    expect(c.enableForwarding).toBe(false);
    expect(c.blockedRanges).toEqual(['10.0.0.0/8', '100.64.0.0/10']);
  });

  it('refuses bad values naming the field', () => {
    const bad: Array<[string[], string]> = [
      [['--host-cidr', '10.11.0.1/16'], '--host-cidr'],
      [['--veth-cidr', '10.12.0.0/24'], '--veth-cidr'],
      [['--host-cidr', '10.12.0.0/16'], '--host-cidr'],
      [['--tap-ip', '169.254.0.300'], '--tap-ip'],
      [['--host-veth-prefix', 'averyverylongp-'], '--host-veth-prefix'],
      [['--tap-name', 'has space'], '--tap-name'],
      [['--reservation', 'consul'], '--consul-addr'],
      [['--blocked-ranges', 'nope'], '--blocked-ranges'],
      [['--pool-new-size', '-1'], '--pool-new-size'],
    ];
    for (const [argv, field] of bad) {
      let err: unknown;
      try {
        loadNetAgentConfig({ argv, env: {} });
      } catch (e) {
        err = e;
      }
      expect(err, argv.join(' ')).toBeInstanceOf(ConfigInvalid);
      expect((err as Error).message, argv.join(' ')).toContain(field);
    }
  });
});
