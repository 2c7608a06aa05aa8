/**
 * The egress proxy: one per agent, with one listening socket in each slot namespace whose policy
 * has domain rules (an nft `redirect` there sends every new TCP connection from the guest to it).
 * For each connection it reads the original destination (SO_ORIGINAL_DST) and judges it by
 * address; only when the address alone is refused and names could allow it does it wait for the
 * first bytes and read the name (TLS SNI, HTTP Host). A connection allowed by its name is dialed
 * to that name as the node resolves it (addresses in always-denied ranges skipped: DNS rebinding),
 * never to the address the guest chose. Replacing a slot's policy re-judges its open connections
 * and resets those the new policy refuses.
 *
 * Once a connection is judged and its upstream connected, the rest is a plain byte tunnel: both
 * sockets go to the native tunnel engine (splice on its own threads, off this event loop), with
 * the bytes already read from the guest sent first. Without the engine (an old native library,
 * or `tunnelThreads` 0) Node pipes them.
 */
import { connect, createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '#logging';
import {
  close as closeFd,
  dupCloexec,
  socketFd,
  listenTcp4,
  originalDestination,
  TunnelEngine,
  tunnelEngineAvailable,
  type NetnsSwitch,
  type TunnelEnded,
} from '#native';
import { parseConnectionHead, type HeadResult } from './connection-head.js';
import { usesProxy, type EgressPolicy } from './egress-policy.js';
import { inRanges, judge, type Destination, type Verdict } from './egress-verdict.js';
import { parseIpv4, type Cidr } from './ipv4.js';
import type { NameResolver } from './name-resolver.js';
import type { SlotSpec } from './slot-layout.js';
import { NETNS_DIR } from './slot-network.js';

interface ProxiedConnection {
  client: Socket;
  upstream?: Socket;
  destination: Destination;
  /** `a.b.c.d:port` as the guest dialed it, for logs. */
  target: string;
  name?: string;
  /** Where it was dialed when allowed by name (judged again on a policy change). */
  dialed?: Destination;
  /** Its tunnel in the native engine, once the sockets were handed over. */
  tunnel?: number;
  done: boolean;
}

interface SlotProxy {
  idx: number;
  sandboxId: string;
  policy: EgressPolicy;
  server?: Server;
  connections: Set<ProxiedConnection>;
}

export interface EgressProxyOptions {
  /** Port the listener takes in each slot namespace (the nft redirect's target). */
  port: number;
  resolver: NameResolver;
  /** Never reached, whatever a policy says (private, link-local, metadata, loopback...). */
  alwaysDenied: Cidr[];
  netns: NetnsSwitch;
  logger: Logger;
  /** How long a connection the address alone refuses may take to send its TLS hello / request. */
  headTimeoutMs: number;
  dialTimeoutMs: number;
  onConnection?: (result: 'allowed' | 'refused') => void;
  /** Threads of the native tunnel engine that carries allowed connections; 0: Node pipes them. */
  tunnelThreads?: number;
  tunnelMode?: 'splice' | 'copy';
}

export class EgressProxy {
  private readonly slots = new Map<number, SlotProxy>();
  private engine: TunnelEngine | undefined;
  /** Connections in the engine by tunnel id, until the engine reports their end. */
  private readonly tunnels = new Map<number, { slot: SlotProxy; c: ProxiedConnection }>();

  constructor(private readonly o: EgressProxyOptions) {
    const threads = o.tunnelThreads ?? 0;
    if (threads > 0 && !tunnelEngineAvailable()) {
      o.logger.warn('native tunnel engine not in libsbxnative.so (rebuild native/): egress bytes piped by Node');
    } else if (threads > 0) {
      this.engine = new TunnelEngine({ threads, mode: o.tunnelMode ?? 'splice' });
      this.engine.onEnded((e) => this.tunnelEnded(e));
    }
  }

  /**
   * Makes `policy` the slot's policy at once: the listener is opened (before the caller adds
   * the redirect) or closed (after the caller removed it), and open connections the policy now
   * refuses are reset.
   */
  set(spec: SlotSpec, sandboxId: string, policy: EgressPolicy): void {
    let slot = this.slots.get(spec.idx);
    if (!slot) {
      if (!usesProxy(policy)) return;
      slot = { idx: spec.idx, sandboxId, policy, connections: new Set() };
      this.slots.set(spec.idx, slot);
    }
    slot.policy = policy;
    slot.sandboxId = sandboxId;
    if (usesProxy(policy) && !slot.server) slot.server = this.listen(slot, spec);
    if (!usesProxy(policy) && slot.server) {
      slot.server.close();
      slot.server = undefined;
    }
    for (const c of slot.connections) {
      if (!this.keeps(slot.policy, c)) this.cut(slot, c, 'refused by the new policy');
    }
    this.forgetIfIdle(slot);
  }

  /** The policy the proxy holds for a slot (undefined when it holds none). */
  policyOf(idx: number): EgressPolicy | undefined {
    return this.slots.get(idx)?.policy;
  }

  /** The slot's sandbox is gone: listener closed, every connection reset. */
  drop(idx: number): void {
    const slot = this.slots.get(idx);
    if (!slot) return;
    slot.server?.close();
    slot.server = undefined;
    for (const c of slot.connections) this.cut(slot, c, 'slot released');
    this.slots.delete(idx);
  }

  close(): void {
    for (const idx of [...this.slots.keys()]) this.drop(idx);
    // Cut connections were reset already; destroy() closes every fd the engine still holds.
    this.engine?.destroy();
    this.engine = undefined;
    this.tunnels.clear();
  }

  /** Slots with a listener, and connections open through the proxy (for tests and stats). */
  counts(): { listeners: number; connections: number } {
    let listeners = 0;
    let connections = 0;
    for (const s of this.slots.values()) {
      if (s.server) listeners++;
      connections += s.connections.size;
    }
    return { listeners, connections };
  }

  private listen(slot: SlotProxy, spec: SlotSpec): Server {
    // Made inside the slot namespace by plain syscalls; Node then serves the fd on its loop.
    const fd = this.o.netns.run(`${NETNS_DIR}/${spec.namespace}`, () => listenTcp4('0.0.0.0', this.o.port));
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
      void this.handle(slot, client);
    });
    server.on('error', (err) => {
      this.o.logger.error({ err, sandboxId: slot.sandboxId, slot: slot.idx }, 'egress proxy listener failed');
    });
    server.listen({ fd });
    return server;
  }

  private keeps(policy: EgressPolicy, c: ProxiedConnection): boolean {
    if (c.dialed) return judge(policy, this.o.alwaysDenied, c.dialed, c.name).allow;
    return judge(policy, this.o.alwaysDenied, c.destination).allow;
  }

  private cut(slot: SlotProxy, c: ProxiedConnection, reason: string): void {
    if (c.done) return;
    this.o.logger.info(
      { sandboxId: slot.sandboxId, slot: slot.idx, target: c.target, name: c.name, reason },
      'egress connection cut',
    );
    this.finish(slot, c, true);
  }

  private finish(slot: SlotProxy, c: ProxiedConnection, reset: boolean): void {
    if (c.done) return;
    c.done = true;
    slot.connections.delete(c);
    if (c.tunnel !== undefined) {
      // Both sockets are the engine's: it resets them (its ended event then forgets the id).
      this.engine?.close(c.tunnel);
      this.forgetIfIdle(slot);
      return;
    }
    // A reset tells the guest at once; destroy() alone would look like an orderly close.
    if (reset && !c.client.destroyed) c.client.resetAndDestroy();
    else c.client.destroy();
    // The guest's socket is gone: nothing the upstream still sends can reach it.
    c.upstream?.destroy();
    this.forgetIfIdle(slot);
  }

  private forgetIfIdle(slot: SlotProxy): void {
    if (!slot.server && slot.connections.size === 0 && this.slots.get(slot.idx) === slot) this.slots.delete(slot.idx);
  }

  private refuse(slot: SlotProxy, c: ProxiedConnection, reason: string): void {
    this.o.onConnection?.('refused');
    this.o.logger.info(
      { sandboxId: slot.sandboxId, slot: slot.idx, target: c.target, name: c.name, reason },
      'egress connection refused',
    );
    this.finish(slot, c, true);
  }

  private async handle(slot: SlotProxy, client: Socket): Promise<void> {
    client.on('error', () => undefined); // resets from the guest are normal; the close handler cleans up
    const fd = socketFd(client);
    let original: { address: string; port: number };
    try {
      original = originalDestination(fd);
    } catch (err) {
      this.o.logger.warn({ err, sandboxId: slot.sandboxId }, 'egress proxy: no original destination');
      client.resetAndDestroy();
      return;
    }
    const c: ProxiedConnection = {
      client,
      destination: { address: parseIpv4(original.address), port: original.port },
      target: `${original.address}:${original.port}`,
      done: false,
    };
    slot.connections.add(c);
    client.once('close', () => {
      if (c.tunnel === undefined) this.finish(slot, c, false);
    });

    let verdict = judge(slot.policy, this.o.alwaysDenied, c.destination);
    let head: Buffer = Buffer.alloc(0);
    if (!verdict.allow && slot.policy.domains.entries.length > 0) {
      // Refused by address, but a name could allow it: read what the client asks for.
      const read = await this.readHead(client);
      if (c.done) return;
      head = read.bytes;
      if (read.result.kind === 'invalid') return this.refuse(slot, c, read.result.reason);
      if (read.result.kind === 'name') c.name = read.result.name;
      verdict = judge(slot.policy, this.o.alwaysDenied, c.destination, c.name);
    }
    if (!verdict.allow) return this.refuse(slot, c, verdict.reason);
    await this.dial(slot, c, verdict, head);
  }

  /** The first bytes, until they name a host, prove they cannot, or time out. */
  private readHead(client: Socket): Promise<{ result: HeadResult; bytes: Buffer }> {
    return new Promise((resolve) => {
      let bytes = Buffer.alloc(0);
      const finish = (result: HeadResult) => {
        clearTimeout(timer);
        client.off('data', onData);
        client.off('end', onEnd);
        client.off('close', onEnd);
        client.pause();
        resolve({ result, bytes });
      };
      const onData = (chunk: Buffer) => {
        bytes = Buffer.concat([bytes, chunk]);
        const result = parseConnectionHead(bytes);
        if (result.kind !== 'more') finish(result);
      };
      const onEnd = () => finish({ kind: 'invalid', reason: 'closed before naming a host' });
      const timer = setTimeout(
        () => finish({ kind: 'invalid', reason: `no TLS hello or HTTP request within ${this.o.headTimeoutMs} ms` }),
        this.o.headTimeoutMs,
      );
      client.on('data', onData);
      client.once('end', onEnd);
      client.once('close', onEnd);
      client.resume();
    });
  }

  private async dial(slot: SlotProxy, c: ProxiedConnection, verdict: Verdict & { allow: true }, head: Buffer) {
    let host = c.target.split(':')[0]!;
    if (verdict.dial === 'name') {
      let addresses: string[];
      try {
        addresses = await this.o.resolver.resolve4(verdict.name);
      } catch (err) {
        return this.refuse(slot, c, (err as Error).message);
      }
      if (c.done) return;
      const usable = addresses.filter((a) => !inRanges(this.o.alwaysDenied, parseIpv4(a)));
      if (!usable.length) return this.refuse(slot, c, `${verdict.name} resolves into an always-denied range`);
      host = usable[0]!;
      c.dialed = { address: parseIpv4(host), port: c.destination.port };
      // The policy may have changed while the name was resolved.
      if (!this.keeps(slot.policy, c)) return this.refuse(slot, c, 'refused by the new policy');
    }
    const upstream = connect({ host, port: c.destination.port, allowHalfOpen: true, noDelay: true });
    c.upstream = upstream;
    upstream.setTimeout(this.o.dialTimeoutMs, () => {
      if (upstream.connecting) upstream.destroy(new Error(`dial timed out after ${this.o.dialTimeoutMs} ms`));
    });
    upstream.once('error', (err) => {
      if (c.done || c.tunnel !== undefined) return;
      this.o.logger.debug({ err, sandboxId: slot.sandboxId, target: c.target, name: c.name }, 'egress upstream failed');
      this.finish(slot, c, true);
    });
    // An orderly close of the upstream reaches the guest through the pipe (end after the last
    // byte); the guest's socket closing then finishes the connection.
    upstream.once('connect', () => {
      upstream.setTimeout(0);
      if (c.done) return;
      this.o.onConnection?.('allowed');
      this.o.logger.debug(
        { sandboxId: slot.sandboxId, target: c.target, name: c.name, dialed: `${host}:${c.destination.port}` },
        'egress connection proxied',
      );
      c.client.setNoDelay(true);
      if (this.engine && this.toEngine(slot, c, upstream, head)) return;
      if (head.length) upstream.write(head);
      c.client.pipe(upstream);
      upstream.pipe(c.client);
    });
  }

  /**
   * Hands both sockets to the tunnel engine (true), or leaves them to Node when it cannot take
   * them (false). Called before either socket was read from since the head: bytes Node still
   * buffers for the guest's socket are sent after the head.
   */
  private toEngine(slot: SlotProxy, c: ProxiedConnection, upstream: Socket, head: Buffer): boolean {
    const buffered: Buffer[] = [head];
    for (let chunk: Buffer | null; (chunk = c.client.read() as Buffer | null) !== null;) buffered.push(chunk);
    const first = Buffer.concat(buffered);
    const fds: number[] = [];
    try {
      for (const s of [c.client, upstream]) {
        const fd = socketFd(s);
        if (fd < 0) throw new Error('socket has no descriptor');
        fds.push(dupCloexec(fd));
      }
      c.tunnel = this.engine!.adopt(fds[0]!, fds[1]!, first);
    } catch (err) {
      for (const fd of fds) closeFd(fd);
      this.o.logger.warn(
        { err, sandboxId: slot.sandboxId, target: c.target },
        'egress tunnel engine did not take a connection; piped by Node',
      );
      if (first.length > head.length) c.client.unshift(first.subarray(head.length));
      return false;
    }
    this.tunnels.set(c.tunnel, { slot, c });
    // The engine holds duplicates: closing Node's descriptors sends nothing to either peer.
    c.client.destroy();
    upstream.destroy();
    return true;
  }

  private tunnelEnded(e: TunnelEnded): void {
    const entry = this.tunnels.get(e.id);
    if (!entry) return;
    this.tunnels.delete(e.id);
    const { slot, c } = entry;
    this.o.logger.debug(
      {
        sandboxId: slot.sandboxId,
        target: c.target,
        name: c.name,
        bytesUp: e.bytesAtoB,
        bytesDown: e.bytesBtoA,
        end: e.reason,
        errno: e.errno || undefined,
      },
      'egress connection ended',
    );
    if (c.done) return;
    c.done = true;
    slot.connections.delete(c);
    this.forgetIfIdle(slot);
  }
}
