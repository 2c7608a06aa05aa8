import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { nativeLibraryPath } from './native-library.js';

const buildDir = dirname(nativeLibraryPath);

/** Path of a C test peer built by native/Makefile (native/build/<name>): tests and benchmarks only. */
export function peerBinary(name: string): string {
  const path = join(buildDir, name);
  if (!existsSync(path)) throw new Error(`${path} missing: run make -C native`);
  return path;
}

/**
 * A running uffd-peer (native/c/peers/uffd-peer.c), for tests and benchmarks: the Firecracker
 * side of the UFFD handshake, then a guest driven by line commands (see the C file's header).
 * `command` sends one line and resolves with its answer.
 */
export class UffdPeerProcess {
  readonly child: ChildProcessWithoutNullStreams;
  private readonly lines: Interface;
  private readonly waiting: Array<(line: string) => void> = [];
  private readonly queued: string[] = [];
  stderr = '';
  readonly exited: Promise<number | null>;

  constructor(args: string[]) {
    this.child = spawn(peerBinary('uffd-peer'), args, { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stderr.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.lines = createInterface({ input: this.child.stdout });
    this.lines.on('line', (line) => {
      const w = this.waiting.shift();
      if (w) w(line);
      else this.queued.push(line);
    });
    this.exited = new Promise((resolve) => this.child.on('exit', (code) => resolve(code)));
  }

  nextLine(timeoutMs = 30_000): Promise<string> {
    const q = this.queued.shift();
    if (q !== undefined) return Promise.resolve(q);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`uffd-peer: no answer in ${timeoutMs} ms; stderr: ${this.stderr}`)),
        timeoutMs,
      );
      const onExit = () => reject(new Error(`uffd-peer exited; stderr: ${this.stderr}`));
      this.child.once('exit', onExit);
      this.waiting.push((line) => {
        clearTimeout(timer);
        this.child.off('exit', onExit);
        resolve(line);
      });
    });
  }

  async command(line: string, timeoutMs?: number): Promise<string> {
    this.child.stdin.write(`${line}\n`);
    return this.nextLine(timeoutMs);
  }

  /** Waits for the handshake to be sent; returns the peer's pid. */
  async ready(): Promise<number> {
    const line = await this.nextLine();
    const m = /^ready (\d+)$/.exec(line);
    if (!m?.[1]) throw new Error(`uffd-peer: unexpected first line ${line}; stderr: ${this.stderr}`);
    return Number(m[1]);
  }

  async exit(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.stdin.end('exit\n');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}
