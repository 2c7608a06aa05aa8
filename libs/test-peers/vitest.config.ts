import { projectConfig } from '../../vitest.shared.js';

// Starting a peer may first build it (minutes, once per machine): see scripts/test-peers.sh.
export default projectConfig('test-peers', { hookTimeout: 1_800_000 });
