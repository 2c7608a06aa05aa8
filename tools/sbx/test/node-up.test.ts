/**
 * `npm start`'s main job, `./sbx node up --demo`, end to end: the five services come up,
 * a sandbox is created, paused and resumed, the CLI drives the node, and SIGINT (Ctrl-C)
 * leaves the machine as it was. Everything runs inside a throwaway "node" network namespace
 * this test makes (with its own uplink to an "internet" namespace), so the machine's own
 * network and firewall are never touched.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { builtEntry, eventually, logLine, sbx, ServiceProcess } from '#test-kit';

const exec = promisify(execFile);
const built = builtEntry('orchestrator') !== undefined && builtEntry('vmm-sim') !== undefined;
const isRoot = process.getuid?.() === 0;
if (!built || !isRoot)
  console.warn(`node-up test skipped: ${!isRoot ? 'needs root for namespaces' : 'run npm run build first'}`);

const tag = `nu${process.pid % 100000}`;
const nodeNs = `${tag}node`;
const inetNs = `${tag}inet`;
const slotPrefix = `${tag}s-`;

async function sh(cmd: string, args: string[], input?: string): Promise<string> {
  if (input === undefined) return (await exec(cmd, args)).stdout;
  return new Promise((ok, fail) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.once('close', (code) => (code === 0 ? ok(out) : fail(new Error(`${cmd} ${args.join(' ')}: ${err}`))));
    child.stdin.end(input);
  });
}

/** What the node could leave behind: namespaces, links, rules, mounts, processes, sockets. */
async function machineState(dataDir: string) {
  const netns = (await sh('ip', ['netns', 'list'])).split('\n').filter((l) => l.startsWith(slotPrefix));
  const links = (await sh('ip', ['-n', nodeNs, '-o', 'link']))
    .split('\n')
    .map((l) => l.split(':')[1]?.trim())
    .filter(Boolean);
  const nft = await sh('ip', ['netns', 'exec', nodeNs, 'nft', 'list', 'ruleset']);
  const iptables = (await sh('ip', ['netns', 'exec', nodeNs, 'iptables-save']).catch(() => ''))
    .split('\n')
    .filter((l) => l && !l.startsWith('#'));
  const mounts = (await readFile('/proc/mounts', 'utf8'))
    .split('\n')
    .filter((l) => l.includes(dataDir) || l.includes(tag));
  const processes: string[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(dataDir)) processes.push(cmdline.replaceAll('\0', ' '));
  }
  const runDir = join(dataDir, 'run');
  const sockets = existsSync(runDir) ? await readdir(runDir) : [];
  return { netns, links, nft, iptables, mounts, processes, sockets };
}

describe.skipIf(!built || !isRoot)('./sbx node up --demo (npm start)', () => {
  let dataDir: string;
  let node: ServiceProcess | undefined;
  const output = () => node?.logs.join('\n') ?? '';
  let before: Awaited<ReturnType<typeof machineState>>;

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), `${tag}-`));
    await sh('ip', ['netns', 'add', nodeNs]);
    await sh('ip', ['netns', 'add', inetNs]);
    await sh(
      'ip',
      ['-n', nodeNs, '-batch', '-'],
      [
        'link set lo up',
        `link add up0 type veth peer name wan0 netns ${inetNs}`,
        'addr add 198.51.100.2/24 dev up0',
        'link set up0 up',
        'route add default via 198.51.100.1',
        '',
      ].join('\n'),
    );
    before = await machineState(dataDir);
  });

  afterAll(async () => {
    await node?.kill();
    for (const ns of (await sh('ip', ['netns', 'list'])).split('\n')) {
      const name = ns.split(' ')[0];
      if (name && name.startsWith(tag)) await sh('ip', ['netns', 'del', name]).catch(() => undefined);
    }
    await rm(dataDir, { recursive: true, force: true });
  });

  it('starts the node, creates, pauses and resumes a sandbox, and serves', async () => {
    node = await ServiceProcess.start({
      name: 'node up',
      args: ['node', 'up', '--demo', '--data-dir', dataDir, '--grpc-port', '5008'],
      wrapper: ['ip', 'netns', 'exec', nodeNs],
      env: {
        SBX_NET_AGENT_NAMESPACE_PREFIX: slotPrefix,
        SBX_NET_AGENT_UPLINK: 'up0',
        SBX_NET_AGENT_NODE_ID: tag,
        SBX_DNS_METRICS_PORT: '0',
        SBX_NET_AGENT_METRICS_PORT: '0',
        SBX_BLOCK_SERVER_METRICS_PORT: '0',
        SBX_UFFD_SERVER_METRICS_PORT: '0',
        SBX_ORCHESTRATOR_METRICS_PORT: '0',
      },
      // Its own process group, as a shell gives a foreground job: Ctrl-C below signals the group.
      detached: true,
      ready: logLine('serving on 127.0.0.1:5008'),
      readyTimeoutMs: 240_000,
    });
    expect(output()).toMatch(/demo: create demo-\w+ from template base… \d+ ms/);
    expect(output()).toMatch(/demo: pause into build [0-9a-f-]{36}… \d+ ms/);
    expect(output()).toMatch(/demo: resume from that build… \d+ ms/);
    expect(output()).not.toMatch(/demo failed/);
    // The SandboxService has no authentication: local mode serves it on loopback only.
    const listening = (await sh('ip', ['netns', 'exec', nodeNs, 'ss', '-Hltn', 'sport = :5008']))
      .split('\n')
      .filter(Boolean)
      .map((l) => l.trim().split(/\s+/)[3]);
    expect(listening).toEqual(['127.0.0.1:5008']);
  }, 300_000);

  it('answers the CLI: list shows the resumed demo sandbox, --json parses', async () => {
    const demoId = /create (demo-\w+)/.exec(output())![1]!;
    const list = JSON.parse(await sh(sbx, ['list', '--json', '--data-dir', dataDir])) as { sandboxId: string }[];
    expect(list.map((s) => s.sandboxId)).toContain(demoId);
    const builds = JSON.parse(await sh(sbx, ['builds', '--json', '--data-dir', dataDir])) as { buildId: string }[];
    expect(builds.length).toBeGreaterThanOrEqual(2);
    const status = JSON.parse(
      await sh(sbx, ['status', '--json', '--data-dir', dataDir, '--interval-ms', '200']),
    ) as Record<string, number>;
    expect(status['sandboxes']).toBe(1);
    // The admission limits (E2B's defaults) and what the running sandbox really has.
    expect({ starting: status['startingLimit'], running: status['sandboxesLimit'] }).toEqual({
      starting: 3,
      running: 512,
    });
    const demo = (list as { sandboxId: string; vcpu?: number; ramMb?: number }[]).find((s) => s.sandboxId === demoId);
    expect({ vcpus: status['runningVcpus'], ramMb: status['runningRamMb'] }).toEqual({
      vcpus: demo?.vcpu,
      ramMb: demo?.ramMb,
    });
    expect(demo?.ramMb).toBeGreaterThan(0);
    // A checkpoint through the CLI: a new build, the sandbox still running.
    const checkpoint = JSON.parse(await sh(sbx, ['checkpoint', demoId, '--json', '--data-dir', dataDir])) as {
      buildId: string;
    };
    expect(checkpoint.buildId).toMatch(/^[0-9a-f-]{36}$/);
    const stillRunning = JSON.parse(await sh(sbx, ['list', '--json', '--data-dir', dataDir])) as {
      sandboxId: string;
    }[];
    expect(stillRunning.map((s) => s.sandboxId)).toContain(demoId);
    // Local mode keeps VMMs started ahead, each in a slot of its own: once the pool is full again,
    // the slots in use are the sandbox's and the pool's, nothing more.
    const settled = await eventually(
      async () => {
        const s = JSON.parse(
          await sh(sbx, ['status', '--json', '--data-dir', dataDir, '--interval-ms', '50']),
        ) as Record<string, number>;
        return s['vmmPoolSize']! > 0 && s['vmmPoolWaiting'] === s['vmmPoolSize'] && s;
      },
      { timeoutMs: 30_000, what: 'the VMM pool full again' },
    );
    expect(settled['slotsInUse']).toBe(1 + settled['vmmPoolSize']!);
    expect(status['memorySandboxes']).toBe(1);
    expect(status['nbdDevices']).toBe(1);
    const pausedBuild = /pause into build ([0-9a-f-]{36})/.exec(output())![1]!;
    const header = JSON.parse(
      await sh(sbx, ['inspect-header', join(dataDir, 'bucket', pausedBuild, 'memfile.header'), '--json']),
    ) as { metadata: { buildId: string; generation: number } };
    expect(header.metadata.buildId).toBe(pausedBuild);
    expect(header.metadata.generation).toBe(1);
    // The local node's bucket, found through --data-dir like the other operator commands.
    const data = JSON.parse(
      await sh(sbx, [
        'inspect-data',
        '--build',
        pausedBuild,
        '--kind',
        'rootfs',
        '--layered',
        '--json',
        '--data-dir',
        dataDir,
      ]),
    ) as { blocks: unknown[]; nonEmpty: number };
    expect(data.blocks.length).toBeGreaterThan(0);
    expect(data.nonEmpty).toBeGreaterThan(0);
    const nodeRecord = JSON.parse(await readFile(join(dataDir, 'node.json'), 'utf8')) as {
      sockets: Record<string, string>;
    };
    for (const socket of Object.values(nodeRecord.sockets)) await sh(sbx, ['health', socket]);
    await sh(sbx, ['create', '--id', `${tag}-cli`, '--data-dir', dataDir]);
    const paused = JSON.parse(await sh(sbx, ['pause', `${tag}-cli`, '--json', '--data-dir', dataDir])) as {
      buildId: string;
    };
    await sh(sbx, ['resume', `${tag}-cli`, '--build', paused.buildId, '--data-dir', dataDir]);
    await sh(sbx, ['set-timeout', `${tag}-cli`, '600', '--data-dir', dataDir]);
    await sh(sbx, ['kill', `${tag}-cli`, '--data-dir', dataDir]);
    const after = JSON.parse(await sh(sbx, ['list', '--json', '--data-dir', dataDir])) as { sandboxId: string }[];
    expect(after.map((s) => s.sandboxId)).not.toContain(`${tag}-cli`);
  }, 180_000);

  it('builds a template with ./sbx template create (progress on stderr), lists it, and creates a sandbox from it', async () => {
    const rootfs = join(dataDir, 't1-rootfs.ext4');
    await sh('truncate', ['-s', '8M', rootfs]);
    await sh('mkfs.ext4', ['-q', '-F', '-b', '4096', '-L', 't1', rootfs]);
    const create = await exec(sbx, [
      'template',
      'create',
      '--rootfs',
      rootfs,
      '--name',
      't1',
      '--json',
      '--data-dir',
      dataDir,
    ]);
    const created = JSON.parse(create.stdout) as { templateId: string; buildId: string; rootfsBytes: number };
    expect(created).toMatchObject({ templateId: 't1', rootfsBytes: 8 * 1024 * 1024 });
    expect(created.buildId).toMatch(/^[0-9a-f-]{36}$/);
    for (const step of ['[1/4] rootfs', '[2/4] boot', '[3/4] snapshot', '[4/4] build'])
      expect(create.stderr).toContain(step);
    const stored = await readFile(join(dataDir, 'bucket', created.buildId, 'rootfs.ext4'));
    expect(stored.equals(await readFile(rootfs))).toBe(true);
    const templates = JSON.parse(await sh(sbx, ['template', 'list', '--json', '--data-dir', dataDir])) as {
      templateId: string;
      buildId: string;
      memoryBytes: number;
    }[];
    expect(templates.map((t) => t.templateId)).toEqual(['base', 't1']);
    expect(templates[1]).toMatchObject({ templateId: 't1', buildId: created.buildId });
    expect(templates[1]!.memoryBytes).toBeGreaterThan(0);
    const again = await exec(sbx, [
      'template',
      'create',
      '--rootfs',
      rootfs,
      '--name',
      't1',
      '--data-dir',
      dataDir,
    ]).then(
      () => undefined,
      (err: { stderr: string }) => err.stderr,
    );
    expect(again).toMatch(/template 't1' exists/);
    await sh(sbx, ['create', '--template', 't1', '--id', `${tag}-t1`, '--data-dir', dataDir]);
    const list = JSON.parse(await sh(sbx, ['list', '--json', '--data-dir', dataDir])) as {
      sandboxId: string;
      template: string;
    }[];
    expect(list.find((s) => s.sandboxId === `${tag}-t1`)?.template).toBe('t1');
    await sh(sbx, ['kill', `${tag}-t1`, '--data-dir', dataDir]);
  }, 180_000);

  it('Ctrl-C, pressed twice, stops everything and leaves the machine as it was', async () => {
    expect((await machineState(dataDir)).netns.length).toBeGreaterThan(0);
    // A terminal's Ctrl-C signals its whole foreground process group, not only `node up`:
    // the group is the one `ip netns exec` (which execs sbx) leads.
    process.kill(-node!.pid!, 'SIGINT');
    await eventually(() => output().includes('stopping the node'), { intervalMs: 20 });
    // The impatient second Ctrl-C, while the services are still taking down what they made.
    process.kill(-node!.pid!, 'SIGINT');
    expect(await node!.exited).toBe(0);
    const after = await machineState(dataDir);
    expect(after).toEqual(before);
  }, 120_000);
});
