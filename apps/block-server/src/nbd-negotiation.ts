import {
  ClientFlag,
  decodeClientFlags,
  decodeExportName,
  decodeInfoRequest,
  decodeOptionRequest,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeOptionErrorReply,
  encodeOptionReply,
  encodeServerEntry,
  InfoType,
  NbdProtocolError,
  Option,
  OptionReply,
  type OptionRequest,
} from '#nbd';
import { capabilitiesOf, transmissionFlags, type NbdExport, type NbdExportTable } from './nbd-export.js';

const KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;

/**
 * The server side of fixed-newstyle negotiation (proto.md "Fixed newstyle negotiation"), after
 * the greeting: client flags, then options until the client picks an export (NBD_OPT_GO or
 * NBD_OPT_EXPORT_NAME) or aborts. No socket here: the connection feeds it the bytes that
 * arrived and sends what it replies. A violation that loses framing (unknown client flags, bad
 * option magic, an oversized option, an unknown name with EXPORT_NAME, which has no error
 * reply) throws NbdProtocolError: the connection must close.
 */
export class NbdNegotiation {
  /** The export the client picked: every later byte is transmission. */
  chosen: NbdExport | undefined;
  /** NBD_OPT_ABORT was acknowledged: close the connection. */
  aborted = false;
  private flagsSeen = false;
  private noZeroes = false;

  constructor(
    private readonly exports: NbdExportTable,
    /** Largest READ/WRITE payload, reported in NBD_INFO_BLOCK_SIZE. */
    private readonly maxPayload: number,
  ) {}

  /** Takes whole messages from `buf`; returns how many bytes it took. */
  feed(buf: Buffer, reply: (bytes: Buffer) => void): number {
    let pos = 0;
    while (!this.chosen && !this.aborted) {
      const rest = buf.subarray(pos);
      if (!this.flagsSeen) {
        const flags = decodeClientFlags(rest);
        if (flags === undefined) break;
        if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          throw new NbdProtocolError(
            'NBD_BAD_CLIENT_FLAGS',
            `client flags 0x${flags.toString(16)} include unknown bits`,
          );
        }
        this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
        this.flagsSeen = true;
        pos += 4;
        continue;
      }
      const option = decodeOptionRequest(rest);
      if (!option) break;
      pos += option.size;
      this.onOption(option, reply);
    }
    return pos;
  }

  private onOption({ option, data }: OptionRequest, reply: (bytes: Buffer) => void): void {
    const error = (type: number, message: string): void => reply(encodeOptionErrorReply(option, type, message));
    switch (option) {
      case Option.EXPORT_NAME: {
        let name: string | undefined;
        try {
          name = decodeExportName(data);
        } catch {
          name = undefined;
        }
        const found = name === undefined ? undefined : this.exports.find(name);
        // No way to send an error to NBD_OPT_EXPORT_NAME: the spec says close.
        if (!found) {
          throw new NbdProtocolError(
            'NBD_UNKNOWN_EXPORT',
            `unknown export ${JSON.stringify(name)} requested with NBD_OPT_EXPORT_NAME`,
          );
        }
        reply(encodeExportNameReply(found.blocks.size, transmissionFlags(capabilitiesOf(found.blocks)), this.noZeroes));
        this.chosen = found;
        return;
      }
      case Option.ABORT:
        reply(encodeOptionReply(option, OptionReply.ACK));
        this.aborted = true;
        return;
      case Option.LIST:
        if (data.length !== 0) return error(OptionReply.ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const name of this.exports.names())
          reply(encodeOptionReply(option, OptionReply.SERVER, encodeServerEntry(name)));
        reply(encodeOptionReply(option, OptionReply.ACK));
        return;
      case Option.INFO:
      case Option.GO: {
        let info;
        try {
          info = decodeInfoRequest(data);
        } catch (err) {
          return error(OptionReply.ERR_INVALID, (err as Error).message);
        }
        const found = this.exports.find(info.exportName);
        if (!found) return error(OptionReply.ERR_UNKNOWN, `no export named ${JSON.stringify(info.exportName)}`);
        const infos = [encodeInfoExport(found.blocks.size, transmissionFlags(capabilitiesOf(found.blocks)))];
        if (info.requests.includes(InfoType.NAME)) infos.push(encodeInfoName(found.name));
        if (info.requests.includes(InfoType.DESCRIPTION) && found.description) {
          infos.push(encodeInfoDescription(found.description));
        }
        if (info.requests.includes(InfoType.BLOCK_SIZE))
          infos.push(encodeInfoBlockSize(1, found.blockSize, this.maxPayload));
        for (const data of infos) reply(encodeOptionReply(option, OptionReply.INFO, data));
        reply(encodeOptionReply(option, OptionReply.ACK));
        if (option === Option.GO) this.chosen = found;
        return;
      }
      default:
        // Structured replies, meta contexts, TLS, extended headers: not offered. Clients fall back.
        return error(OptionReply.ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}
