import { constants } from 'node:os';

const errnoNames = new Map<number, string>(Object.entries(constants.errno).map(([name, value]) => [value, name]));

/** A failed Linux call: `code` is the errno name (stable), `errno` its number, `syscall` what failed. */
export class SyscallError extends Error {
  readonly code: string;
  constructor(
    readonly syscall: string,
    readonly errno: number,
    detail?: string,
  ) {
    const code = errnoNames.get(errno) ?? `E${errno}`;
    super(`${syscall} failed: ${code}${detail ? ` (${detail})` : ''}`);
    this.name = 'SyscallError';
    this.code = code;
  }
}

/** Our C helpers return -errno on failure; this turns that into a SyscallError. */
export function check(syscall: string, result: number | bigint, detail?: string): number {
  const n = Number(result);
  if (n < 0) throw new SyscallError(syscall, -n, detail);
  return n;
}

export const errno = constants.errno;
