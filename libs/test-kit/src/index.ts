// Test-only: the eslint config forbids importing this from production code.
export { eventually, type EventuallyOptions } from './eventually.js';
export { freeTcpPort } from './free-tcp-port.js';
export { HugePagesUnavailable, reserveHugePages, type HugePageReservation } from './huge-page-reservation.js';
export { mappings, openFds, steadyFdCount, type Mapping } from './process-holdings.js';
export { acceptsConnections, fileExists, grpcServing, logLine, type Readiness } from './readiness.js';
export { builtEntry, repoRoot, requireBuilt, sbx } from './repo-root.js';
export { ServiceProcess, type ServiceStart } from './service-process.js';
export { ECHO_SERVER_PY, NAMED_CLIENT_PY, WEB_SERVER_PY, selfSignedCertArgs } from './internet-peers.js';
