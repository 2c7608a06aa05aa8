#!/usr/bin/env python3
"""Drives libnbd (python3-libnbd) against an NBD URI for the block-server tests.

  random-io URI SEED STRIPE STRIPES COUNT   random 4 KiB writes with 16 in flight in this
      client's stripe of blocks, read back and compared; prints {offset: sha256} as JSON.
  write-stream URI FLUSH_EVERY               writes block i (pattern of i) at a scattered
      offset, a FLUSH every FLUSH_EVERY writes; prints "flushed N" after each completed flush.
  verify-stream URI N                        checks blocks 0..N-1 of write-stream.
"""
import hashlib
import json
import random
import sys

import nbd

BS = 4096


def stream_block(i):
    return bytes(((i * 7 + j) & 0xFF) for j in range(BS))


def stream_offset(i, blocks):
    return ((i * 37) % blocks) * BS


def random_io(uri, seed, stripe, stripes, count):
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // BS
    rng = random.Random(seed)
    mine = [b for b in range(blocks) if b % stripes == stripe]
    chosen = rng.sample(mine, count)
    written = {}
    pending = []
    for b in chosen:
        data = rng.randbytes(BS)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        pending.append(h.aio_pwrite(buf, b * BS))
        written[b * BS] = data
        while h.aio_in_flight() >= 16:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in pending:
        h.aio_command_completed(cookie)
    reads = {}
    for off in written:
        buf = nbd.Buffer(BS)
        reads[off] = (buf, h.aio_pread(buf, off))
        while h.aio_in_flight() >= 16:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, (buf, _) in reads.items():
        if bytes(buf.to_bytearray()) != written[off]:
            print(f"mismatch at {off}", file=sys.stderr)
            sys.exit(1)
    h.flush()
    h.shutdown()
    print(json.dumps({str(off): hashlib.sha256(d).hexdigest() for off, d in written.items()}))


def write_stream(uri, flush_every):
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // BS
    i = 0
    while True:
        h.pwrite(stream_block(i), stream_offset(i, blocks))
        i += 1
        if i % flush_every == 0:
            h.flush()
            print(f"flushed {i}", flush=True)


def verify_stream(uri, n):
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // BS
    for i in range(n):
        got = h.pread(BS, stream_offset(i, blocks))
        if got != stream_block(i):
            print(f"block {i} at {stream_offset(i, blocks)} lost", file=sys.stderr)
            sys.exit(1)
    h.shutdown()
    print(f"verified {n}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "random-io":
        random_io(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif cmd == "write-stream":
        write_stream(sys.argv[2], int(sys.argv[3]))
    elif cmd == "verify-stream":
        verify_stream(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown command {cmd}")
