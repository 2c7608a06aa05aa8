import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '#test-kit';

export type PeerName = 'fake-gcs-server' | 'consul' | 'nomad';

const found = new Map<PeerName, string>();

/**
 * The path of a pinned test peer's binary, built by scripts/test-peers.sh on first use on this
 * machine (minutes of CPU; later calls return at once). Throws the script's own message when it
 * cannot (no Go toolchain, a failed build), so the test fails saying what to install.
 */
export function peerBinary(name: PeerName): string {
  const known = found.get(name);
  if (known) return known;
  const script = join(repoRoot, 'scripts', 'test-peers.sh');
  let out: string;
  try {
    // stderr goes to the test output: a first build reports its progress there.
    out = execFileSync('bash', [script, name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  } catch (err) {
    throw new Error(
      `test peer ${name} is not available: scripts/test-peers.sh ${name} failed (see its message above)`,
      {
        cause: err,
      },
    );
  }
  const line = out
    .split('\n')
    .map((l) => l.split(' '))
    .find(([n]) => n === name);
  const path = line?.[1];
  if (!path || !existsSync(path)) throw new Error(`scripts/test-peers.sh ${name} printed no binary path: ${out}`);
  found.set(name, path);
  return path;
}
