export * from './nbd-constants.js';
export * from './nbd-protocol-error.js';
export * from './nbd-handshake.js';
export * from './nbd-transmission.js';
