import { existsSync } from 'node:fs';
import { Socket } from 'node:net';
import { NbdNetlink, close as closeFd, unixSocketPair } from '#native';
import type { Logger } from '#logging';
import type { BlockDevice, KernelAttachment } from './block-device.js';
import type { KernelAttacher } from './device-manager.js';
import { capabilitiesOf, transmissionFlags } from './nbd-export.js';
import { NbdDevicePool } from './nbd-device-pool.js';

/** Seconds the kernel waits on one request before failing it. */
const REQUEST_TIMEOUT_SECONDS = 30;
/**
 * Seconds a device with every connection dead waits for NBD_CMD_RECONFIGURE instead of
 * failing I/O: covers a block-server restart (Nomad restarts it within seconds).
 */
const DEAD_CONN_TIMEOUT_SECONDS = 120;
const RELEASE_TIMEOUT_MS = 10_000;

/**
 * Binds devices to /dev/nbdX through the kernel's generic-netlink nbd family: a socketpair per
 * device, one end handed to the kernel, the other served by the device's NBD server in the
 * transmission phase (the kernel does no handshake).
 */
export class KernelNbd implements KernelAttacher {
  readonly available = true;

  private constructor(
    private readonly netlink: NbdNetlink,
    private readonly pool: NbdDevicePool,
    private readonly logger: Logger,
  ) {}

  /** The attacher when this kernel has NBD, else undefined (with the reason logged). */
  static async detect(logger: Logger): Promise<KernelNbd | undefined> {
    if (!existsSync('/sys/module/nbd')) {
      logger.info('kernel NBD not available (/sys/module/nbd absent): devices are served on their sockets only');
      return undefined;
    }
    try {
      const netlink = NbdNetlink.open();
      const pool = await NbdDevicePool.open({
        connected: (index) => netlink.status(index).some((d) => d.index === index && d.connected),
      });
      logger.info({ family: netlink.family, devices: pool.maxDevices }, 'kernel NBD available');
      return new KernelNbd(netlink, pool, logger);
    } catch (err) {
      logger.warn({ err }, 'kernel NBD present but unusable: devices are served on their sockets only');
      return undefined;
    }
  }

  async attach(device: BlockDevice): Promise<KernelAttachment> {
    const index = await this.pool.acquire();
    try {
      const theirs = this.serve(device);
      try {
        this.netlink.connect({
          index,
          sizeBytes: device.record.size,
          blockSize: device.record.blockSize,
          fds: [theirs],
          timeoutSeconds: REQUEST_TIMEOUT_SECONDS,
          deadConnTimeoutSeconds: DEAD_CONN_TIMEOUT_SECONDS,
          // The kernel's handshake-free connect is told what a client would have been told.
          serverFlags: transmissionFlags(capabilitiesOf(device.overlay)),
          backendIdentifier: `sbx-block:${device.sandboxId}`,
        });
      } finally {
        // The kernel holds its own reference to the socket now.
        closeFd(theirs);
      }
      await this.waitConnected(index);
      this.logger.info({ sandboxId: device.sandboxId, device: `/dev/nbd${index}` }, 'kernel device attached');
      return this.attachment(index);
    } catch (err) {
      await this.pool.release(index).catch(() => undefined);
      throw err;
    }
  }

  async reattach(device: BlockDevice, index: number): Promise<KernelAttachment> {
    this.pool.claim(index);
    const theirs = this.serve(device);
    try {
      this.netlink.reconfigure({ index, fds: [theirs], deadConnTimeoutSeconds: DEAD_CONN_TIMEOUT_SECONDS });
    } finally {
      closeFd(theirs);
    }
    this.logger.info(
      { sandboxId: device.sandboxId, device: `/dev/nbd${index}` },
      'kernel device reconfigured after restart',
    );
    return this.attachment(index);
  }

  async close(): Promise<void> {
    this.netlink.close();
  }

  /** A socketpair whose one end the device serves; returns the kernel's end. */
  private serve(device: BlockDevice): number {
    const [ours, theirs] = unixSocketPair();
    try {
      device.server.adopt(new Socket({ fd: ours, readable: true, writable: true }), device.record.exportName);
    } catch (err) {
      closeFd(ours);
      closeFd(theirs);
      throw err;
    }
    return theirs;
  }

  private attachment(index: number): KernelAttachment {
    return {
      index,
      path: `/dev/nbd${index}`,
      detach: async () => {
        this.netlink.disconnect(index);
        await this.pool.waitAndRelease(index, RELEASE_TIMEOUT_MS);
      },
      abandon: () => undefined,
    };
  }

  private async waitConnected(index: number): Promise<void> {
    const deadline = Date.now() + 5000;
    while (!this.netlink.status(index).some((d) => d.index === index && d.connected)) {
      if (Date.now() > deadline) throw new Error(`/dev/nbd${index} did not report connected`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
}
