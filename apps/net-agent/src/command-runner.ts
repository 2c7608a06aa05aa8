import { spawn, type ChildProcess } from 'node:child_process';
import { TypedError } from '#service-kit';

export class CommandFailed extends TypedError {
  readonly code = 'COMMAND_FAILED';
  constructor(
    readonly command: string,
    readonly exitCode: number | null,
    readonly stderr: string,
    readonly where?: string,
  ) {
    super(`${command}${where ? ` in ${where}` : ''} failed (exit ${exitCode}): ${stderr.trim().slice(0, 2000)}`);
  }
}

export interface CommandResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
}

/**
 * Starts a tool with its program on stdin and collects its output. `start` lets a caller fork
 * it synchronously from inside another namespace (see NetnsSwitch); the wait is asynchronous.
 */
export function startCommand(
  file: string,
  args: string[],
  input: string,
): Promise<CommandResult> & { child: ChildProcess } {
  const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const result = new Promise<CommandResult>((resolve, reject) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (d: Buffer) => out.push(d));
    child.stderr!.on('data', (d: Buffer) => err.push(d));
    child.once('error', reject);
    child.once('close', (code) =>
      resolve({ stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString(), exitCode: code }),
    );
  });
  // A tool that exits before reading all of stdin must not crash us with EPIPE.
  child.stdin!.on('error', () => undefined);
  child.stdin!.end(input);
  return Object.assign(result, { child });
}

/** Runs a tool and throws CommandFailed on a non-zero exit. */
export async function runCommand(file: string, args: string[], input = '', where?: string): Promise<string> {
  const res = await startCommand(file, args, input);
  if (res.exitCode !== 0) throw new CommandFailed(`${file} ${args.join(' ')}`, res.exitCode, res.stderr, where);
  return res.stdout;
}

export async function checkResult(pending: Promise<CommandResult>, label: string, where?: string): Promise<string> {
  const res = await pending;
  if (res.exitCode !== 0) throw new CommandFailed(label, res.exitCode, res.stderr, where);
  return res.stdout;
}
