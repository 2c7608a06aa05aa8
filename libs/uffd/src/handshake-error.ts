/** Why a handshake was refused; stable codes for logs, metrics and the gRPC edge. */
export type HandshakeProblem =
  | 'BAD_JSON'
  | 'NOT_AN_ARRAY'
  | 'NO_REGIONS'
  | 'TOO_MANY_REGIONS'
  | 'BAD_FIELD'
  | 'BAD_PAGE_SIZE'
  | 'ZERO_SIZE'
  | 'UNALIGNED'
  | 'OVERLAP'
  | 'PAST_MEMORY_FILE'
  | 'FD_COUNT'
  | 'TRUNCATED';

/** A Firecracker UFFD handshake we cannot serve; `region` is the index of the offending region. */
export class HandshakeInvalid extends Error {
  readonly code = 'UFFD_HANDSHAKE_INVALID';
  constructor(
    readonly problem: HandshakeProblem,
    message: string,
    readonly region?: number,
  ) {
    super(`invalid UFFD handshake (${problem}): ${message}`);
    this.name = 'HandshakeInvalid';
  }
}
