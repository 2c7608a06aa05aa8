import { GuestNetwork, type GuestNetworkOptions } from './guest-network.js';

/**
 * The guest's link plumbed while the VMM still waits for its snapshot load. Firecracker opens
 * its tap at load in microseconds; the double replaces the tap with a veth into a guest
 * namespace, which takes several `ip` processes (half of a load on a busy machine). A VMM the
 * orchestrator starts ahead (its VMM pool) sits in its slot with nothing else to do, so the
 * plumbing happens then, over the slot's tap as it is, with the default guest address; the
 * load takes it when it asks for the same link, and otherwise puts the tap back and plumbs
 * what the snapfile says. No tap in the namespace (a template build, a test without a
 * slot): nothing is prepared.
 */
export class PreparedNetwork {
  private taken = false;

  private constructor(private readonly network: Promise<GuestNetwork | undefined>) {}

  static start(options: GuestNetworkOptions): PreparedNetwork {
    const network = GuestNetwork.attachExisting(options).catch((err: unknown) => {
      options.logger.warn({ err: (err as Error).message, tap: options.tapName }, 'preparing the guest link failed');
      return undefined;
    });
    return new PreparedNetwork(network);
  }

  /** The prepared link if it is the one asked for (once); a different one is put back first. */
  async take(options: GuestNetworkOptions): Promise<GuestNetwork | undefined> {
    if (this.taken) return undefined;
    this.taken = true;
    const network = await this.network;
    if (!network) return undefined;
    if (network.matches(options)) return network;
    await network.close();
    return undefined;
  }

  /** Puts the tap back when no load took the link. */
  async close(): Promise<void> {
    if (this.taken) return;
    this.taken = true;
    await (await this.network)?.close();
  }
}
