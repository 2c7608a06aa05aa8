import { status, type handleUnaryCall, type ServerUnaryCall } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import { toServiceError } from './error-status.js';

export interface UnaryEdgeOptions {
  logger: Logger;
  /** Told of every failed call (e.g. to count results by method); the error is answered anyway. */
  onError?: (step: string, error: unknown) => void;
}

export type UnaryBody<Req, Res> = (request: Req, call: ServerUnaryCall<Req, Res>) => Res | Promise<Res>;

/**
 * The gRPC edge of a service: `handle(step, body)` is a grpc-js unary handler that answers what
 * `body` returns and turns what it throws into a status through the one table
 * (error-status.ts), with a message naming the step. A synchronous result is answered without
 * a promise hop. Failures are logged (with the request's sandboxId when it has one): INTERNAL
 * as errors, the rest as warnings.
 */
export function unaryHandlers(options: UnaryEdgeOptions) {
  const { logger, onError } = options;
  return function handle<Req, Res>(step: string, body: UnaryBody<Req, Res>): handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const fail = (err: unknown) => {
        const mapped = toServiceError(step, err);
        const sandboxId = (call.request as { sandboxId?: unknown } | undefined)?.sandboxId || undefined;
        const level = mapped.code === status.INTERNAL ? 'error' : 'warn';
        logger[level]({ step, sandboxId, code: status[mapped.code!], err }, 'call failed');
        onError?.(step, err);
        callback(mapped, null);
      };
      let result: Res | Promise<Res>;
      try {
        result = body(call.request, call);
      } catch (err) {
        fail(err);
        return;
      }
      if (result instanceof Promise) result.then((res) => callback(null, res), fail);
      else callback(null, result);
    };
  };
}
