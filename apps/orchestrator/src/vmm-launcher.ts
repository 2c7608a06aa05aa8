import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, renameSync, symlinkSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { setPriority } from 'node:os';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from '#logging';
import { FirecrackerApi } from './firecracker-api.js';
import { VmmExited } from './orchestrator-errors.js';
import { watchProcessExit } from './process-exit-watch.js';
import { isSameProcess, processStartTicks, type ProcessIdentity } from './process-identity.js';
import type { VmmCgroups } from './vmm-cgroups.js';
import { VmmLogTail } from './vmm-log-tail.js';

/**
 * Starts the VMM like the seed's fc/process.go start script: in a private mount namespace
 * where the rootfs path recorded in the snapfile at template-build time is a symlink to this
 * sandbox's device (or NBD socket), inside the slot's network namespace. The chain
 * unshare → sh → ip netns exec → vmm only execs, so the spawned pid is the VMM's pid; it first
 * moves itself into the VMM's own cgroup, when it has one (vmm-cgroups.ts).
 */
const START_SCRIPT = [
  'set -e',
  'link=$1; target=$2; ns=$3; cgroup=$4; shift 4',
  'if [ -n "$cgroup" ]; then echo $$ > "$cgroup/cgroup.procs"; fi',
  'mount --make-rprivate /',
  // Without a target (a VMM started ahead, vmm-pool.ts) $link is the directory to cover;
  // the link is made later from outside, through /proc/{pid}/root (linkRootfs).
  'if [ -n "$target" ]; then dir=$(dirname "$link"); else dir=$link; fi',
  'mkdir -p "$dir"',
  'mount -t tmpfs -o size=64k,mode=0755 tmpfs "$dir"',
  'if [ -n "$target" ]; then ln -s "$target" "$link"; fi',
  // A VMM started ahead runs niced until a sandbox takes it (handOver): its start must not take
  // the CPU from the creates it is there to serve. Threads inherit it; handOver resets each.
  'if [ -z "$target" ]; then set -- nice -n 10 "$@"; fi',
  'if [ -n "$ns" ]; then exec ip netns exec "$ns" "$@"; else exec "$@"; fi',
].join('\n');

export interface VmmLaunchSpec {
  sandboxId: string;
  apiSocket: string;
  /** The rootfs path recorded in the snapfile (the base build's path at template-build time). */
  rootfsLinkPath: string;
  /** This sandbox's device: /dev/nbdX or the NBD socket. */
  rootfsTarget: string;
  /** Network namespace of the slot; empty runs in the host's (template builds without network). */
  namespace: string;
  stdoutPath: string;
  stderrPath: string;
}

export interface VmmHandle {
  readonly pid: number;
  readonly startTicks: number;
  readonly apiSocket: string;
  readonly api: FirecrackerApi;
  /** Resolves when the process is gone, with how it ended. */
  readonly exited: Promise<string>;
  isAlive(): boolean;
  /** SIGKILL and wait until the process is gone (it holds the device and the uffd). */
  kill(): Promise<void>;
}

/** A VMM started ahead of any sandbox (vmm-pool.ts): no rootfs link yet. */
export interface IdleVmmLaunchSpec extends Omit<VmmLaunchSpec, 'rootfsLinkPath' | 'rootfsTarget'> {
  /** Covered by an empty tmpfs in the VMM's private mount namespace; linkRootfs fills it. */
  rootfsDir: string;
}

export interface IdleVmmHandle extends VmmHandle {
  /**
   * Makes `linkPath` (under the launch's rootfsDir) a symlink to `target` in the VMM's own
   * mount namespace, reached through /proc/{pid}/root: no process to start.
   */
  linkRootfs(linkPath: string, target: string): Promise<void>;
  /** Moves its log files to the sandbox's and follows them with the sandbox's logger. */
  handOver(o: { stdoutPath: string; stderrPath: string; logger: Logger }): Promise<void>;
}

export interface VmmLauncher {
  /** What runs: 'firecracker <path>' or 'vmm-sim (test double)'. */
  readonly description: string;
  readonly isDouble: boolean;
  launch(spec: VmmLaunchSpec, logger: Logger): Promise<VmmHandle>;
  /** Starts a VMM that waits on its API socket for a sandbox not known yet; absent = no pool. */
  launchIdle?(spec: IdleVmmLaunchSpec, logger: Logger): Promise<IdleVmmHandle>;
  /** Re-attaches to a VMM started by a previous orchestrator run, if it is still the same process. */
  adopt(
    record: ProcessIdentity & { apiSocket: string; stdoutPath: string; stderrPath: string },
    logger: Logger,
  ): Promise<VmmHandle | undefined>;
}

export interface VmmCommand {
  /** argv before `--api-sock <path>`. */
  argv: string[];
  description: string;
  isDouble: boolean;
}

/** Real Firecracker when its binary and a kernel are configured, else the `./sbx vmm-sim` double. */
export function chooseVmmCommand(options: {
  firecrackerBin?: string | undefined;
  kernelPath?: string | undefined;
  sbxBin?: string | undefined;
}): VmmCommand {
  if (options.firecrackerBin && options.kernelPath) {
    return { argv: [options.firecrackerBin], description: `firecracker ${options.firecrackerBin}`, isDouble: false };
  }
  const sbx = options.sbxBin ?? findSbxLauncher();
  return { argv: [sbx, 'vmm-sim'], description: `vmm-sim test double (${sbx} vmm-sim)`, isDouble: true };
}

/** The repository's ./sbx, found upwards from this module (source or dist tree). */
export function findSbxLauncher(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 8; i++) {
    const candidate = join(dir, 'sbx');
    if (existsSync(candidate) && existsSync(join(dir, 'package.json'))) return candidate;
    dir = resolve(dir, '..');
  }
  return 'sbx';
}

export class ProcessVmmLauncher implements VmmLauncher {
  readonly description: string;
  readonly isDouble: boolean;

  /** Once per run, before the first launch: cgroups of VMMs that ended while no orchestrator watched. */
  private swept: Promise<unknown> | undefined;

  constructor(
    private readonly command: VmmCommand,
    private readonly startTimeoutMs = 10_000,
    /** A cgroup of its own for each VMM, outside ours (so a Nomad restart of ours spares them). */
    private readonly cgroups?: VmmCgroups,
  ) {
    this.description = command.description;
    this.isDouble = command.isDouble;
    // Cgroups of VMMs killed without a handle (strays at a restart) are empty: swept now and then.
    if (cgroups) setInterval(() => void cgroups.sweep(), 30_000).unref();
  }

  launch(spec: VmmLaunchSpec, logger: Logger): Promise<VmmHandle> {
    return this.start(spec, undefined, logger);
  }

  launchIdle(spec: IdleVmmLaunchSpec, logger: Logger): Promise<IdleVmmHandle> {
    return this.start({ ...spec, rootfsLinkPath: spec.rootfsDir, rootfsTarget: '' }, spec.rootfsDir, logger);
  }

  private async start(spec: VmmLaunchSpec, rootfsDir: string | undefined, logger: Logger): Promise<IdleVmmHandle> {
    if (this.cgroups) await (this.swept ??= this.cgroups.sweep());
    const cgroup = await this.cgroups?.create(spec.sandboxId);
    const stdout = await open(spec.stdoutPath, 'a').catch(async (err: unknown) => {
      if (cgroup) await this.cgroups!.remove(cgroup);
      throw err;
    });
    const stderr = await open(spec.stderrPath, 'a');
    let child;
    try {
      child = spawn(
        'unshare',
        [
          '-m',
          '--propagation',
          'private',
          '--',
          'sh',
          '-c',
          START_SCRIPT,
          'vmm-start',
          spec.rootfsLinkPath,
          spec.rootfsTarget,
          spec.namespace,
          cgroup ?? '',
          ...this.command.argv,
          '--api-sock',
          spec.apiSocket,
        ],
        // Own session: the VMM outlives an orchestrator crash and is adopted on restart.
        { detached: true, stdio: ['ignore', stdout.fd, stderr.fd] },
      );
    } finally {
      await stdout.close();
      await stderr.close();
    }
    const pid = child.pid;
    if (pid === undefined) {
      const error = await new Promise<Error>((res) => child.once('error', res));
      if (cgroup) await this.cgroups!.remove(cgroup);
      throw new VmmExited(spec.sandboxId, `could not be started: ${error.message}`);
    }
    child.unref();
    let exitedHow: string | undefined;
    const exited = new Promise<string>((res) => {
      child.once('exit', (code, signal) => {
        exitedHow = signal ? `killed by ${signal}` : `exited with code ${code}`;
        res(exitedHow);
      });
    });
    const startTicks = (await processStartTicks(pid)) ?? 0;
    if (cgroup) void exited.then(() => this.cgroups!.remove(cgroup));
    const handle = this.handle(
      spec.sandboxId,
      { pid, startTicks },
      spec.apiSocket,
      exited,
      () => exitedHow === undefined,
      logger,
      { ...spec, cgroup, rootfsDir },
    );
    const api = handle.api;
    const deadline = Date.now() + this.startTimeoutMs;
    let lastError = 'api socket never appeared';
    while (Date.now() < deadline) {
      if (exitedHow !== undefined) break;
      if (existsSync(spec.apiSocket)) {
        try {
          await api.describe();
          return handle;
        } catch (err) {
          lastError = (err as Error).message;
        }
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    const why = exitedHow ?? `did not answer on ${spec.apiSocket} within ${this.startTimeoutMs} ms (${lastError})`;
    await handle.kill();
    throw new VmmExited(spec.sandboxId, why === exitedHow ? `exited while starting: ${why}` : why);
  }

  async adopt(
    record: ProcessIdentity & { apiSocket: string; stdoutPath: string; stderrPath: string },
    logger: Logger,
  ): Promise<VmmHandle | undefined> {
    if (!(await isSameProcess(record))) return undefined;
    const cgroup = await this.cgroups?.of(record.pid);
    let gone = false;
    // Not our child: its pidfd tells when it ends (no timer per adopted VMM).
    const exited = new Promise<string>((res) => {
      watchProcessExit(record, () => {
        gone = true;
        if (cgroup) void this.cgroups!.remove(cgroup);
        res('exited (adopted process)');
      });
    });
    return this.handle(
      logger.bindings()['sandboxId'] as string,
      record,
      record.apiSocket,
      exited,
      () => !gone,
      logger,
      {
        stdoutPath: record.stdoutPath,
        stderrPath: record.stderrPath,
        adopted: true,
        cgroup,
      },
    );
  }

  private handle(
    sandboxId: string,
    identity: ProcessIdentity,
    apiSocket: string,
    exited: Promise<string>,
    alive: () => boolean,
    logger: Logger,
    logs: {
      stdoutPath: string;
      stderrPath: string;
      adopted?: boolean;
      cgroup?: string | undefined;
      /** Launched idle: the directory linkRootfs may fill. */
      rootfsDir?: string | undefined;
    },
  ): IdleVmmHandle {
    const out = new VmmLogTail(logs.stdoutPath, logger, 'stdout');
    const err = new VmmLogTail(logs.stderrPath, logger, 'stderr');
    out.start(logs.adopted);
    err.start(logs.adopted);
    let owner = { sandboxId, logger };
    void exited.then(async (how) => {
      await Promise.all([out.stop(), err.stop()]);
      owner.logger.info({ pid: identity.pid, how, sandboxId: owner.sandboxId }, 'vmm process ended');
    });
    return {
      pid: identity.pid,
      startTicks: identity.startTicks,
      apiSocket,
      api: new FirecrackerApi(apiSocket),
      exited,
      isAlive: alive,
      linkRootfs: async (linkPath: string, target: string) => {
        const inside = logs.rootfsDir === undefined ? '..' : relative(logs.rootfsDir, linkPath);
        if (!isAbsolute(linkPath) || inside === '' || inside.startsWith('..') || isAbsolute(inside)) {
          throw new Error(
            `rootfs link ${linkPath} is not under the VMM's rootfs directory ${logs.rootfsDir ?? '(none)'}`,
          );
        }
        if (!alive()) throw new VmmExited(owner.sandboxId, 'exited before its rootfs was linked');
        // On the event loop: a directory and a link in the VMM's tmpfs, on every create's path,
        // where each trip through the libuv pool costs a turn of the loop.
        const path = `/proc/${identity.pid}/root${linkPath}`;
        mkdirSync(dirname(path), { recursive: true });
        symlinkSync(target, path);
      },
      handOver: async (to) => {
        // Back to normal priority, every thread (nice is per thread on Linux). /proc is read on
        // the event loop: no disk behind it.
        for (const tid of threadsOf(identity.pid)) {
          try {
            setPriority(Number(tid), 0);
          } catch {
            // A thread that just ended.
          }
        }
        // The log files move into the sandbox's directory; their tails follow them (same files,
        // same watches). Renames on the event loop: two metadata changes on the create's path.
        renameSync(logs.stdoutPath, to.stdoutPath);
        renameSync(logs.stderrPath, to.stderrPath);
        logs.stdoutPath = to.stdoutPath;
        logs.stderrPath = to.stderrPath;
        owner = { sandboxId: to.logger.bindings()['sandboxId'] as string, logger: to.logger };
        out.moveTo(to.stdoutPath, to.logger);
        err.moveTo(to.stderrPath, to.logger);
      },
      kill: async () => {
        if (!alive()) return;
        // Everything the VMM started goes with it; the process group kill below covers a kernel without cgroup.kill.
        if (logs.cgroup) await this.cgroups?.kill(logs.cgroup);
        for (const target of [-identity.pid, identity.pid]) {
          try {
            process.kill(target, 'SIGKILL');
          } catch {
            // Already gone, or no process group of that id.
          }
        }
        const deadline = Date.now() + 10_000;
        while (alive() && Date.now() < deadline) {
          if (!(await isSameProcess(identity))) break;
          await new Promise((r) => setTimeout(r, 10));
        }
        await Promise.race([exited, new Promise((r) => setTimeout(r, 2000))]);
        // Whoever waits on kill() finds the VMM's cgroup gone too (an adopted VMM has no exit event).
        if (logs.cgroup) await this.cgroups?.remove(logs.cgroup);
      },
    };
  }
}

/** The thread ids of a process (none once it is gone). */
function threadsOf(pid: number): string[] {
  try {
    return readdirSync(`/proc/${pid}/task`);
  } catch {
    return [];
  }
}
