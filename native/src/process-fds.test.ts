import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { close, pidfdOpen } from './fd.js';
import { fdNumberIn, pidfdGetfd, sameOpenFile } from './process-fds.js';
import { userfaultfd } from './userfaultfd.js';

describe('another process fds', () => {
  it('finds the number a process holds our file under and takes a duplicate of it', () => {
    const uffd = userfaultfd();
    const other = openSync('/dev/null', 'r');
    const pidfd = pidfdOpen(process.pid);
    try {
      expect(fdNumberIn(process.pid, uffd)).toBe(uffd);
      const dup = pidfdGetfd(pidfd, uffd);
      expect(dup).not.toBe(uffd);
      expect(sameOpenFile(dup, process.pid, uffd)).toBe(true);
      expect(sameOpenFile(dup, process.pid, other)).toBe(false);
      close(dup);
    } finally {
      close(pidfd);
      close(uffd);
      closeSync(other);
    }
  });

  it('a closed fd of the other process is a clear error', async () => {
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    const pidfd = pidfdOpen(child.pid!);
    try {
      expect(() => pidfdGetfd(pidfd, 999)).toThrow(/pidfd_getfd failed: EBADF \(fd 999\)/);
      expect(fdNumberIn(child.pid!, pidfd)).toBeUndefined();
    } finally {
      close(pidfd);
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
    }
  });
});
