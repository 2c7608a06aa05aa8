import { describe, expect, it } from 'vitest';
import type { SandboxConfig } from '#proto/orchestrator';
import { RequestInvalid } from './orchestrator-errors.js';
import { checkSandboxConfig } from './request-validation.js';

const bounds = { minVcpu: 1, maxVcpu: 8, minRamMb: 64, maxRamMb: 8192 };
const base = (extra: Partial<SandboxConfig> = {}): SandboxConfig =>
  ({
    templateId: 'base',
    buildId: '',
    sandboxId: 's1',
    envVars: {},
    metadata: {},
    vcpu: 1,
    ramMb: 128,
    totalDiskSizeMb: 0,
    maxSandboxLength: 1,
    ...extra,
  }) as SandboxConfig;

describe('checkSandboxConfig: ingress and auto-resume (E2B fields 22 and 24)', () => {
  it('accepts a token, a masked host and the policies off and any', () => {
    const config = base({
      network: { ingress: { trafficAccessToken: 'tok-123_ABC', maskRequestHost: 'localhost:3000' } },
      autoResume: { policy: 'any' },
    });
    expect(checkSandboxConfig(config, bounds).network?.ingress?.maskRequestHost).toBe('localhost:3000');
    expect(() => checkSandboxConfig(base({ autoResume: { policy: 'off' } }), bounds)).not.toThrow();
  });

  it('refuses what cannot go in a header or an unknown policy, naming the field; accepts domain rules', () => {
    const cases: [Partial<SandboxConfig>, string][] = [
      [{ network: { ingress: { trafficAccessToken: 'has space' } } }, 'traffic_access_token'],
      [{ network: { ingress: { trafficAccessToken: 'x'.repeat(513) } } }, 'traffic_access_token'],
      [{ network: { ingress: { maskRequestHost: 'evil\r\nX-Injected: 1' } } }, 'mask_request_host'],
      [{ autoResume: { policy: 'sometimes' } }, 'auto_resume.policy'],
    ];
    for (const [extra, field] of cases) {
      expect(() => checkSandboxConfig(base(extra), bounds)).toThrow(RequestInvalid);
      expect(() => checkSandboxConfig(base(extra), bounds)).toThrow(field);
    }
    // Domain rules are served (net-agent's egress proxy checks and applies them).
    const names = base({ network: { egress: { allowedCidrs: [], deniedCidrs: [], allowedDomains: ['*.x.com'] } } });
    expect(() => checkSandboxConfig(names, bounds)).not.toThrow();
    const cidrs = base({
      allowInternetAccess: false,
      network: { egress: { allowedCidrs: ['1.1.1.1:53'], deniedCidrs: ['10.0.0.0/8'], allowedDomains: [] } },
    });
    expect(() => checkSandboxConfig(cidrs, bounds)).not.toThrow();
  });
});
