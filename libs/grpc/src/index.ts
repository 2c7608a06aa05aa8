export { HealthService, ServingStatus } from './health-service.js';
export {
  isListening,
  startGrpcServer,
  SocketInUse,
  type GrpcServerHandle,
  type GrpcServerOptions,
  type ServedService,
} from './grpc-server.js';
export { dial, unary, waitForServing } from './grpc-client.js';
export { onShutdownSignals } from './shutdown-signals.js';
