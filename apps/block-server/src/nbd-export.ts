import { TransmissionFlag } from '#nbd';
import type { ReadableBlocks, WritableBlocks } from '#storage';

/** One export a server offers: bytes come from `blocks`, the server does not know from where. */
export interface NbdExport {
  name: string;
  description?: string;
  /**
   * The top of a stack of block layers (WritableBlocks when it can write): what it can do is
   * asked with `capabilitiesOf`.
   */
  blocks: ReadableBlocks;
  /** Preferred I/O size reported to clients (NBD_INFO_BLOCK_SIZE). */
  blockSize: number;
}

export interface NbdExportTable {
  /** The export for a requested name; '' asks for the default export. */
  find(name: string): NbdExport | undefined;
  names(): string[];
}

/** A server of one export, which is also the default (''). */
export function singleExport(only: NbdExport): NbdExportTable {
  return { find: (name) => (name === only.name || name === '' ? only : undefined), names: () => [only.name] };
}

/**
 * What a stack of block layers can do, asked of its top layer as nbdkit asks its filters
 * (`can_write`, `can_flush`, `can_trim`, `can_zero`, `can_fua`, `can_multi_conn`); a layer
 * that wraps another answers for the stack below it. `fua` is served by a flush after the
 * write (nbdkit's NBDKIT_FUA_EMULATE).
 */
export interface BlockCapabilities {
  write: boolean;
  flush: boolean;
  trim: boolean;
  zero: boolean;
  fua: boolean;
  /** A flush on one connection makes every connection's acknowledged writes durable. */
  multiConn: boolean;
}

/**
 * A layer's own answer, else what its methods imply and no multi-conn: like nbdkit's
 * default, a client must not assume a flush on one connection covers another unless told.
 */
export function capabilitiesOf(blocks: ReadableBlocks & { capabilities?(): BlockCapabilities }): BlockCapabilities {
  if (blocks.capabilities) return blocks.capabilities();
  const write = typeof (blocks as Partial<WritableBlocks>).writeAt === 'function';
  return { write, flush: write, trim: write, zero: write, fua: write, multiConn: false };
}

/** The 16 transmission flags sent with the export size. */
export function transmissionFlags(can: BlockCapabilities): number {
  let flags = TransmissionFlag.HAS_FLAGS;
  if (!can.write) flags |= TransmissionFlag.READ_ONLY;
  if (can.flush) flags |= TransmissionFlag.SEND_FLUSH;
  if (can.fua && can.flush) flags |= TransmissionFlag.SEND_FUA;
  if (can.write && can.trim) flags |= TransmissionFlag.SEND_TRIM;
  if (can.write && can.zero) flags |= TransmissionFlag.SEND_WRITE_ZEROES;
  if (can.multiConn) flags |= TransmissionFlag.CAN_MULTI_CONN;
  return flags;
}
