import { randomUUID } from 'node:crypto';
import { dial, unary } from '#grpc';
import type { Logger } from '#logging';
import { SandboxServiceClient, type SandboxConfig } from '#proto/orchestrator';
import { controlSocket, type LocalNodeLayout } from './service-plan.js';

export interface DemoResult {
  sandboxId: string;
  pausedBuildId: string;
  createMs: number;
  pauseMs: number;
  resumeMs: number;
}

/**
 * The first sandbox of `npm start`: created from the sample template `base`, paused into a
 * new build, resumed from it, through the same SandboxService an upstream control plane uses.
 */
export async function runDemo(options: { layout: LocalNodeLayout; logger: Logger }): Promise<DemoResult> {
  // The control socket serves the same SandboxService, whatever address the TCP port is on.
  const client = dial(SandboxServiceClient, controlSocket(options.layout, 'orchestrator'));
  const sandboxId = `demo-${randomUUID().slice(0, 8)}`;
  const config = (snapshot: boolean, buildId: string): SandboxConfig => ({
    templateId: 'base',
    buildId,
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId,
    envVars: { GREETING: 'hello from npm start' },
    metadata: { origin: 'npm start' },
    envdVersion: '',
    vcpu: 1,
    ramMb: 0,
    teamId: 'local',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot,
    baseTemplateId: 'base',
    executionId: '',
    volumeMounts: [],
    autoPause: false,
  });
  const timed = async (step: string, run: () => Promise<unknown>): Promise<number> => {
    process.stdout.write(`demo: ${step}… `);
    const started = performance.now();
    await run();
    const ms = performance.now() - started;
    console.log(`${ms.toFixed(0)} ms`);
    return ms;
  };
  const endTime = () => new Date(Date.now() + 3600_000);
  try {
    const createMs = await timed(`create ${sandboxId} from template base`, () =>
      unary(client, client.create, { sandbox: config(false, ''), startTime: new Date(), endTime: endTime() }, 120_000),
    );
    const pausedBuildId = randomUUID();
    const pauseMs = await timed(`pause into build ${pausedBuildId}`, () =>
      unary(client, client.pause, { sandboxId, templateId: 'base', buildId: pausedBuildId }, 300_000),
    );
    const resumeMs = await timed('resume from that build', () =>
      unary(
        client,
        client.create,
        { sandbox: config(true, pausedBuildId), startTime: new Date(), endTime: endTime() },
        120_000,
      ),
    );
    options.logger.info({ sandboxId, pausedBuildId, createMs, pauseMs, resumeMs }, 'demo done');
    const hints: [string, string][] = [
      ['./sbx list', 'running sandboxes'],
      [`./sbx pause ${sandboxId}`, 'pause it into a new build (prints the build id)'],
      [`./sbx resume ${sandboxId} --build <id>`, 'resume it'],
      ['./sbx create --template base', 'another sandbox'],
      [`./sbx kill ${sandboxId}`, 'kill it'],
      ['./sbx builds', 'cached builds'],
      [`./sbx inspect-header ${options.layout.bucketDir}/${pausedBuildId}/memfile.header`, 'the paused memory layer'],
    ];
    const width = Math.max(...hints.map(([c]) => c.length));
    console.log(`\nThe node is running sandbox ${sandboxId}. Drive it with the CLI from another terminal:`);
    for (const [command, what] of hints) console.log(`  ${command.padEnd(width)}  ${what}`);
    return { sandboxId, pausedBuildId, createMs, pauseMs, resumeMs };
  } finally {
    client.close();
  }
}
