export { TypedError, RequestInvalid } from './typed-error.js';
export { STATUS_BY_CODE, statusOf, toServiceError, isServiceError, type ErrorCode } from './error-status.js';
export { unaryHandlers, type UnaryEdgeOptions, type UnaryBody } from './unary-handler.js';
export {
  TeardownStack,
  TeardownFailed,
  describeFailures,
  type TeardownEntry,
  type TeardownFailure,
} from './teardown-stack.js';
export { startOrRollback, stopWith, type RunningService } from './service-start.js';
export { serviceMain, type ServiceCommand } from './service-main.js';
