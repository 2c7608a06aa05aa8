import type { sendUnaryData, ServerUnaryCall, ServerWritableStream } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import type {
  ResumeRouteRequest,
  RouteEvent,
  RoutingServer,
  SandboxRoute,
  WatchRoutesRequest,
} from '#proto/sbx/routing';
import type { AutoResume } from './auto-resume.js';
import { toServiceError } from '#service-kit';
import { checkSafeName } from './request-validation.js';
import type { RouteFeed } from './route-feed.js';

/** `sbx.v1.Routing` (proto/sbx/routing.proto): the ingress proxy's view of the node, control socket only. */
export function routingService(options: { feed: RouteFeed; resume: AutoResume; logger: Logger }): RoutingServer {
  const { feed, resume, logger } = options;
  return {
    watch(call: ServerWritableStream<WatchRoutesRequest, RouteEvent>) {
      const stop = feed.watch((event) => {
        if (!call.cancelled && !call.destroyed) call.write(event);
      });
      logger.info({ watchers: feed.watcherCount }, 'route watch opened');
      let ended = false;
      const end = () => {
        if (ended) return;
        ended = true;
        stop();
        logger.info({ watchers: feed.watcherCount }, 'route watch closed');
      };
      call.once('cancelled', end);
      call.once('close', end);
      call.once('error', end);
    },
    resume(call: ServerUnaryCall<ResumeRouteRequest, SandboxRoute>, callback: sendUnaryData<SandboxRoute>) {
      const { sandboxId, allowResume } = call.request;
      const callDeadline = call.getDeadline();
      const deadline = callDeadline instanceof Date ? callDeadline.getTime() : Number(callDeadline);
      Promise.resolve()
        .then(() => checkSafeName('sandbox_id', sandboxId))
        .then(() => resume.resume(sandboxId, Number.isFinite(deadline) ? deadline : Date.now() + 30_000, allowResume))
        .then(
          (route) => callback(null, route),
          (err: unknown) => {
            const e = toServiceError('resume', err);
            logger.info({ sandboxId, code: e.code, err: e.details }, 'route resume refused');
            callback(e, null);
          },
        );
    },
  };
}
