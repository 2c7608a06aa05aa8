import { createServer } from 'node:http';
import type { Logger } from '#logging';
import { encodeHandshake, parseHandshake } from '#uffd';
import { parseRequest } from './api-request.js';
import { SNAPFILE_FORMAT, SNAPFILE_VERSION, decodeSnapfile, encodeSnapfile } from './snapfile.js';

/**
 * The snapshot load's own code run once, on made-up input, while the VMM waits for its load.
 * A Node process runs each function slowly the first time (compiled on first call, zod builds
 * a schema's parser on its first parse, node loads some of its own modules on first use): a
 * profile of a pooled VMM's load showed 10–15 ms of its ~25 ms of CPU spent so. Nothing here
 * depends on a snapshot or touches anything outside this process (the one socket is a
 * loopback listener closed at once); a failure only means the load runs cold.
 */
export async function warmUpLoadPath(logger: Logger): Promise<void> {
  const started = performance.now();
  try {
    // The API request reader with a load body (serde_json's reader and the load's fields).
    parseRequest(
      'PUT',
      '/snapshot/load',
      Buffer.from(
        JSON.stringify({
          snapshot_path: '/warm-up/snapfile',
          mem_backend: { backend_type: 'Uffd', backend_path: '/warm-up/uffd.sock' },
          enable_diff_snapshots: true,
          resume_vm: false,
        }),
      ),
    );
    // The snapfile codec, every field present.
    decodeSnapfile(
      encodeSnapfile({
        format: SNAPFILE_FORMAT,
        version: SNAPFILE_VERSION,
        memSizeMib: 1,
        pageSize: 4096,
        vcpuCount: 1,
        smt: false,
        bootSeed: 1,
        bootSource: { kernelImagePath: '/warm-up/vmlinux', bootArgs: '' },
        drives: [{ driveId: 'rootfs', pathOnHost: '/warm-up/rootfs.ext4', isRootDevice: true, isReadOnly: false }],
        networkInterfaces: [{ ifaceId: 'eth0', hostDevName: 'tap0' }],
        guestNetwork: { address: '169.254.0.21', prefixLength: 30, gateway: '169.254.0.22' },
        mmds: {},
        envVars: {},
        createdAt: new Date(0).toISOString(),
      }),
    );
    // The uffd handshake codec the load checks its message with.
    const regions = [{ base: 0x7f0000000000, size: 1 << 20, offset: 0, pageSize: 4096 }];
    parseHandshake(encodeHandshake(regions, 'page_size'), { fdCount: 1, memorySize: 1 << 20 });
    // A listening HTTP server, as envd's (node loads its listen path's modules on first use).
    await new Promise<void>((resolve) => {
      const server = createServer();
      server.once('error', () => resolve());
      server.listen(0, '127.0.0.1', () => server.close(() => resolve()));
    });
    logger.debug({ ms: Math.round(performance.now() - started) }, 'load path warmed up');
  } catch (err) {
    logger.warn({ err: (err as Error).message }, 'warming up the load path failed; the load will run cold');
  }
}
