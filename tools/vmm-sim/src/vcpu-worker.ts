import { createHash } from 'node:crypto';
import { closeSync, constants, fstatSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';
import { memoryView } from '#native';
import { bootImagePage } from './boot-image.js';
import type { VcpuReply, VcpuRequest } from './vcpu-protocol.js';

/**
 * The guest's vCPU: the one thread that touches guest memory. Every access is a plain load or
 * store through a view of the mapping, so a page not yet present raises a real page fault
 * that the kernel hands to the userfaultfd (and the uffd-server) while this thread waits,
 * exactly as a vCPU thread waits in Firecracker. Running it off the main thread keeps the
 * API socket answering while a fault is slow, or while a dead uffd-server leaves it frozen.
 */

const port = parentPort;
if (!port) throw new Error('vcpu-worker must run as a worker thread');

/** Set by the first message (`attach`): the thread may start before the VM's memory exists (spare-vcpu.ts). */
const data = { size: 0, pageSize: 4096 };
let guest: Uint8Array = new Uint8Array(0);
let CHUNK = 1024 * 1024;

port.on('message', (request: VcpuRequest) => {
  let reply: VcpuReply;
  const transfer: ArrayBuffer[] = [];
  try {
    reply = { id: request.id, ok: true, result: handle(request, transfer) };
  } catch (err) {
    reply = { id: request.id, ok: false, error: (err as Error).message };
  }
  port.postMessage(reply, transfer);
});

function range(offset: number, length: number): Uint8Array {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeError(`bad guest memory range offset ${offset} length ${length}`);
  }
  if (offset + length > data.size) {
    throw new RangeError(`guest memory range [${offset}, ${offset + length}) past the end (${data.size} bytes)`);
  }
  return guest.subarray(offset, offset + length);
}

function handle(request: VcpuRequest, transfer: ArrayBuffer[]): unknown {
  if (request.op !== 'attach' && data.size === 0) throw new Error('no guest memory attached to this vCPU');
  switch (request.op) {
    case 'attach':
      if (data.size !== 0) throw new Error('guest memory is already attached to this vCPU');
      guest = memoryView(request.address, request.size);
      data.size = request.size;
      data.pageSize = request.pageSize;
      CHUNK = Math.max(1024 * 1024, request.pageSize);
      return undefined;
    case 'write':
      range(request.offset, request.data.length).set(request.data);
      return undefined;
    case 'fill': {
      const target = range(request.offset, request.length);
      const pattern = request.pattern;
      if (pattern.length === 0) throw new RangeError('empty pattern');
      for (let at = 0; at < target.length; at += pattern.length) {
        target.set(pattern.subarray(0, Math.min(pattern.length, target.length - at)), at);
      }
      return undefined;
    }
    case 'read': {
      const copy = new Uint8Array(request.length);
      copy.set(range(request.offset, request.length));
      transfer.push(copy.buffer);
      return copy;
    }
    case 'hash': {
      const source = range(request.offset, request.length);
      const hash = createHash('sha256');
      for (let at = 0; at < source.length; at += CHUNK) hash.update(source.subarray(at, at + CHUNK));
      return hash.digest('hex');
    }
    case 'boot': {
      for (let page = 0; page * data.pageSize < data.size; page++) {
        const target = guest.subarray(page * data.pageSize, (page + 1) * data.pageSize);
        bootImagePage(request.seed, page, target);
      }
      return undefined;
    }
    case 'dump':
      return dump(request.path, request.ranges, request.merge);
    case 'rewrite': {
      // A store of the byte just loaded: a missing fault, then a write (and a write-protect
      // fault where the uffd has WP), with the contents unchanged.
      const target = range(request.offset, 1);
      target[0] = target[0] ?? 0;
      return undefined;
    }
    case 'touch': {
      // One load per page: faults in whatever is missing.
      let sum = 0;
      for (let at = 0; at < data.size; at += data.pageSize) sum ^= guest[at] ?? 0;
      return sum;
    }
    case 'touch-runs': {
      // One load per page of each run, in order (a guest's start faulting its working set in);
      // the checksum of the bytes loaded, in that order, tells a test they were the memory's.
      let checksum = 0;
      let pages = 0;
      for (const [offset, length] of request.runs) {
        const run = range(offset, length);
        for (let at = 0; at < run.length; at += data.pageSize) {
          checksum = (Math.imul(checksum, 31) + (run[at] ?? 0)) >>> 0;
          pages++;
        }
      }
      return { pages, checksum };
    }
  }
}

/**
 * Writes guest memory to a memory file at the same offsets. With `merge` the file is laid over
 * an existing one (Firecracker's diff snapshot onto a base); otherwise it starts empty and
 * all-zero chunks stay holes, which read back as the zeros they are.
 */
function dump(path: string, ranges: [number, number][], merge: boolean): number {
  const fd = openSync(path, merge ? constants.O_RDWR | constants.O_CREAT : 'w', 0o644);
  let written = 0;
  try {
    if (!merge || fstatSync(fd).size !== data.size) ftruncateSync(fd, data.size);
    // Through a small buffer, not straight from the mapping: writing 102 MiB of guest memory
    // from the mapping took twice as long here (the kernel's copy out of a large mapping).
    const buffer = Buffer.allocUnsafe(CHUNK);
    for (const [start, length] of ranges) {
      for (let at = start; at < start + length; at += CHUNK) {
        const n = Math.min(CHUNK, start + length - at);
        const chunk = buffer.subarray(0, n);
        chunk.set(range(at, n));
        if (merge) {
          writeSync(fd, chunk, 0, n, at);
          written += n;
          continue;
        }
        // Runs of non-zero pages only: zero pages stay holes in the fresh file.
        for (let page = 0; page < n;) {
          while (page < n && isZero(chunk.subarray(page, page + data.pageSize))) page += data.pageSize;
          let end = page;
          while (end < n && !isZero(chunk.subarray(end, end + data.pageSize))) end += data.pageSize;
          if (end > page) {
            writeSync(fd, chunk, page, Math.min(end, n) - page, at + page);
            written += Math.min(end, n) - page;
          }
          page = end;
        }
      }
    }
  } finally {
    closeSync(fd);
  }
  return written;
}

function isZero(bytes: Uint8Array): boolean {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  for (let i = words.length * 4; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}
