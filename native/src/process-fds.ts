import { readdirSync, readlinkSync } from 'node:fs';
import koffi from 'koffi';
import { SyscallError } from './syscall-error.js';

// Plain syscalls through libc (x86_64 numbers): no C helper needed for two calls taking ints.
const libc = koffi.load('libc.so.6');
const syscall = libc.func('long syscall(long number, ...)');
const SYS_KCMP = 312;
const SYS_PIDFD_GETFD = 438;
const KCMP_FILE = 0;

function call(name: string, detail: string, ...args: unknown[]): number {
  const r = Number(syscall(...(args as [number, ...unknown[]])));
  if (r < 0) throw new SyscallError(name, koffi.errno(), detail);
  return r;
}

/**
 * A duplicate of another process's fd (pidfd_getfd, needs ptrace access: root). How a restarted
 * uffd-server takes a VMM's userfaultfd back: the VMM keeps it open for the VM's life.
 */
export function pidfdGetfd(pidfd: number, targetFd: number): number {
  return call('pidfd_getfd', `fd ${targetFd}`, SYS_PIDFD_GETFD, 'int', pidfd, 'int', targetFd, 'uint', 0);
}

/** Whether `fd` of this process and `otherFd` of `pid` are the same open file (kcmp KCMP_FILE). */
export function sameOpenFile(fd: number, pid: number, otherFd: number): boolean {
  return (
    call(
      'kcmp',
      `pid ${pid} fd ${otherFd}`,
      SYS_KCMP,
      'int',
      process.pid,
      'int',
      pid,
      'int',
      KCMP_FILE,
      'ulong',
      fd,
      'ulong',
      otherFd,
    ) === 0
  );
}

/** The number `pid` holds our open file `fd` under (found by kcmp over its fd table), or undefined (also when `pid` is gone). */
export function fdNumberIn(pid: number, fd: number): number | undefined {
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined; // the process is gone: it holds nothing
  }
  for (const name of names) {
    const n = Number(name);
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${name}`);
    } catch {
      continue; // closed meanwhile
    }
    if (target.startsWith('socket:') || target.startsWith('pipe:')) continue;
    try {
      if (sameOpenFile(fd, pid, n)) return n;
    } catch {
      // closed meanwhile
    }
  }
  return undefined;
}
