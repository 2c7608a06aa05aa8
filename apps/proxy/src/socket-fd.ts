import { Socket } from 'node:net';
import { dupCloexec, socketFd } from '#native';

/**
 * Takes a connected socket away from Node: returns a duplicate of its descriptor (the caller
 * owns it) and destroys the JS socket. The connection itself stays open, since closing one of
 * two descriptors of a socket sends nothing. Only for a socket that never started reading
 * (`pauseOnConnect`): libuv has not registered it with its epoll and holds no bytes of it.
 */
export function detachSocketFd(socket: Socket): number {
  const fd = socketFd(socket);
  if (fd < 0) throw new Error('socket has no descriptor (closed, or not a TCP socket)');
  const dup = dupCloexec(fd);
  socket.destroy();
  return dup;
}

/**
 * A connected TCP descriptor given back to Node as a socket (the socket owns it from now on,
 * closes it when destroyed). Half-open like the client port's own sockets: a client may send
 * its request, then FIN, then read the answer.
 */
export function socketFromFd(fd: number): Socket {
  return new Socket({ fd, allowHalfOpen: true, readable: true, writable: true });
}
