/** Why a peer's bytes were refused; `code` is stable, the fields say what was wrong. */
export type NbdProtocolErrorCode =
  | 'NBD_BAD_MAGIC'
  | 'NBD_BAD_CLIENT_FLAGS'
  | 'NBD_OPTION_TOO_LARGE'
  | 'NBD_BAD_OPTION_DATA'
  | 'NBD_UNKNOWN_EXPORT'
  | 'NBD_BAD_REPLY';

export class NbdProtocolError extends Error {
  constructor(
    readonly code: NbdProtocolErrorCode,
    message: string,
    readonly facts: Record<string, number | string | bigint> = {},
  ) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}
