export type { ReadableBlocks, WritableBlocks } from './block-source.js';
