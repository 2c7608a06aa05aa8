import { describe, expect, it } from 'vitest';
import { localLayout, localServicePlan } from './service-plan.js';

function flag(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
}

describe('local service plan', () => {
  it('serves the unauthenticated SandboxService on loopback unless told otherwise', () => {
    const layout = localLayout('/tmp/node', 5008);
    const orchestrator = localServicePlan(layout).find((s) => s.name === 'orchestrator')!;
    expect(flag(orchestrator.args, '--grpc-host')).toBe('127.0.0.1');
    expect(flag(orchestrator.args, '--grpc-port')).toBe('5008');
    const told = localServicePlan({ ...layout, grpcHost: '0.0.0.0' }).find((s) => s.name === 'orchestrator')!;
    expect(flag(told.args, '--grpc-host')).toBe('0.0.0.0');
  });
});
