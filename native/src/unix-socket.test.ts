import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { close, pread, pwrite } from './fd.js';
import { memfdCreate } from './memory.js';
import {
  accept,
  dialUnix,
  listenUnix,
  peerCredentials,
  receiveWithFds,
  sendWithFds,
  SOCK_SEQPACKET,
} from './unix-socket.js';

function openFds(): string[] {
  return readdirSync('/proc/self/fd').sort();
}

describe('AF_UNIX with SCM_RIGHTS', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'native-sock-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  function pair(type?: number): [number, number, number] {
    const path = join(dir, 's.sock');
    const listener = listenUnix(path, type === undefined ? {} : { type });
    const client = dialUnix(path, type);
    const server = accept(listener);
    return [listener, client, server];
  }

  it('passes a payload with several fds in both directions, and the fds reach the same files', () => {
    const before = openFds();
    const [listener, client, server] = pair();
    const memfds = [0, 1, 2].map((i) => {
      const fd = memfdCreate(`m${i}`);
      pwrite(fd, Buffer.from(`file-${i}`), 0);
      return fd;
    });
    expect(sendWithFds(client, Buffer.from('{"hello":1}'), memfds)).toBe(11);
    const got = receiveWithFds(server, 1024, 8);
    expect(got).not.toBeNull();
    expect(Buffer.from(got!.payload).toString()).toBe('{"hello":1}');
    expect(got!.fds).toHaveLength(3);
    expect(got!.fdsSent).toBe(3);
    got!.fds.forEach((fd, i) => {
      const b = Buffer.alloc(6);
      pread(fd, b, 0);
      expect(b.toString()).toBe(`file-${i}`);
      expect(memfds).not.toContain(fd);
    });
    // and back, server -> client, writing through the received fd
    pwrite(got!.fds[1]!, Buffer.from('FILE'), 0);
    sendWithFds(server, Buffer.from('x'), [got!.fds[1]!]);
    const back = receiveWithFds(client, 16, 2)!;
    const b = Buffer.alloc(6);
    pread(back.fds[0]!, b, 0);
    expect(b.toString()).toBe('FILE-1');
    for (const fd of [...memfds, ...got!.fds, ...back.fds, client, server, listener]) close(fd);
    expect(openFds()).toEqual(before);
  });

  it('closes descriptors beyond maxFds on receipt instead of leaking them', () => {
    const [listener, client, server] = pair(SOCK_SEQPACKET);
    const memfds = [0, 1, 2, 3].map((i) => memfdCreate(`m${i}`));
    const before = openFds();
    sendWithFds(client, Buffer.from('p'), memfds);
    const got = receiveWithFds(server, 16, 1)!;
    expect(got.fds).toHaveLength(1);
    expect(got.fdsSent).toBe(4);
    expect(openFds()).toHaveLength(before.length + 1);
    for (const fd of [...memfds, ...got.fds, client, server, listener]) close(fd);
  });

  it('reports truncation, EOF and the peer credentials', () => {
    const [listener, client, server] = pair(SOCK_SEQPACKET);
    sendWithFds(client, Buffer.alloc(100, 1));
    const got = receiveWithFds(server, 10, 0)!;
    expect(got.truncated).toBe(true);
    expect(peerCredentials(server).pid).toBe(process.pid);
    close(client);
    const eof = receiveWithFds(server, 10, 0)!;
    expect(eof.payload.length).toBe(0);
    expect(eof.fds).toEqual([]);
    close(server);
    close(listener);
  });

  it('gives errors with the errno name', () => {
    expect(() => dialUnix(join(dir, 'missing.sock'))).toThrow(/connect failed: ENOENT/);
  });
});
