import type { Socket } from 'node:net';

/**
 * The kernel descriptor under a connected net.Socket (libuv's TCP or pipe handle), or -1 once it
 * is closed. Node keeps it on an internal handle; the services need it for socket options Node
 * does not offer and to hand a connection to a native engine.
 */
export function socketFd(socket: Socket): number {
  const handle = (socket as unknown as { _handle?: { fd?: number } | null })._handle;
  return typeof handle?.fd === 'number' ? handle.fd : -1;
}
