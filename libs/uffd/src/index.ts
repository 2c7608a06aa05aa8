export { HandshakeInvalid, type HandshakeProblem } from './handshake-error.js';
export {
  type GuestRegion,
  type ValidateOptions,
  PAGE_4K,
  PAGE_2M,
  SUPPORTED_PAGE_SIZES,
  MAX_REGIONS,
  validateRegions,
  type Handshake,
  type PageSizeKey,
  type ParseOptions,
  decodeRegions,
  parseHandshake,
  encodeHandshake,
} from './handshake-codec.js';
