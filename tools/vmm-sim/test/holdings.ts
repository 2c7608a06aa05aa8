import { mappings, openFds } from '#test-kit';

/** What a process holds: its open fds (by target) and its mappings (by path/kind). */
export interface Holdings {
  fds: string[];
  maps: string[];
}

export function holdings(pid: number): Holdings {
  // Inode numbers differ between two sockets of the same kind: compared by kind.
  const fds = openFds(pid).map((t) => t.replace(/\[\d+\]$/, '[*]'));
  // Anonymous mappings come and go with V8's heap; what a peer may leak are file, memfd and
  // shared mappings, and big anonymous regions the size of guest memory.
  const maps = mappings(pid)
    .filter(
      (m) =>
        m.path.includes('memfd') || m.perms.endsWith('s') || m.path.startsWith('/tmp') || m.path.includes('vmm-sim'),
    )
    .map((m) => `${m.perms} ${m.path} ${m.size}`);
  return { fds: fds.sort(), maps: maps.sort() };
}
