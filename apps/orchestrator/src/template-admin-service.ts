import type { ServerWritableStream } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import { toServiceError } from '#service-kit';
import type {
  CreateTemplateEvent,
  CreateTemplateRequest,
  TemplateAdminServer,
  TemplateInfo,
} from '#proto/sbx/templates';
import { OrchestratorStopping, TemplateExists } from './orchestrator-errors.js';
import type { ResourceBounds } from './request-validation.js';
import { TEMPLATE_BUILD_STEPS, type TemplateBuildRequest } from './template-builder.js';
import type { TemplateCatalogue, TemplateEntry } from './template-catalogue.js';
import { checkCreateTemplate } from './template-request-validation.js';

export interface TemplateAdminOptions {
  templates: TemplateCatalogue;
  /** buildTemplate bound to the node's services (a double in unit tests). */
  build: (req: TemplateBuildRequest) => Promise<TemplateEntry>;
  bounds: ResourceBounds;
  /** Guest memory when the request leaves it 0. */
  defaultMemoryMb: number;
  logger: Logger;
}

export interface TemplateAdmin {
  implementation: TemplateAdminServer;
  /** Aborts the builds in flight and waits until each has given back what it took. */
  stop(): Promise<void>;
}

/**
 * The internal TemplateAdmin API (proto/sbx/templates.proto) on the control socket: builds a
 * template from an ext4 rootfs on the node, streaming each step, and lists the catalogue.
 * One build per template id at a time; a client that goes away aborts its build.
 */
export function templateAdminService(o: TemplateAdminOptions): TemplateAdmin {
  const building = new Map<string, { abort: AbortController; finished: Promise<unknown> }>();
  let stopping = false;

  async function create(call: ServerWritableStream<CreateTemplateRequest, CreateTemplateEvent>): Promise<void> {
    const checked = await checkCreateTemplate(call.request, o.bounds, o.defaultMemoryMb);
    const { templateId } = checked;
    if (building.has(templateId)) throw new TemplateExists(templateId, 'is being built right now');
    if (!checked.replace && o.templates.get(templateId)) {
      throw new TemplateExists(templateId, 'exists; pass replace (--replace) to point it at a new build');
    }
    if (stopping) throw new OrchestratorStopping();
    const abort = new AbortController();
    const onCancel = () => abort.abort(new Error('client went away'));
    call.once('cancelled', onCancel);
    const log = o.logger.child({ templateId });
    log.info({ rootfs: checked.rootfsPath, memoryMb: checked.memoryMb, vcpu: checked.vcpu }, 'template build');
    const finished = o.build({
      templateId,
      rootfsPath: checked.rootfsPath,
      rootfsMb: Math.ceil(checked.rootfsBytes / (1024 * 1024)),
      memoryMb: checked.memoryMb,
      vcpu: checked.vcpu,
      signal: abort.signal,
      onProgress: (p) => {
        if (call.cancelled) return;
        call.write({
          progress: {
            step: p.step,
            stepIndex: TEMPLATE_BUILD_STEPS.indexOf(p.step) + 1,
            stepCount: TEMPLATE_BUILD_STEPS.length,
            done: p.done,
            total: p.total,
            message: p.message,
          },
        });
      },
    });
    building.set(templateId, { abort, finished: finished.catch(() => undefined) });
    try {
      const entry = await finished;
      if (!call.cancelled) call.write({ template: templateInfo(entry) });
    } finally {
      building.delete(templateId);
      call.off('cancelled', onCancel);
    }
  }

  const implementation: TemplateAdminServer = {
    createTemplate(call) {
      create(call).then(
        () => call.end(),
        (err: unknown) => {
          if (call.cancelled) {
            o.logger.warn({ templateId: call.request.templateId }, 'template build abandoned: client went away');
            return;
          }
          o.logger.warn({ templateId: call.request.templateId, err }, 'template build failed');
          call.emit('error', toServiceError('create template', err));
        },
      );
    },
    listTemplates(_call, callback) {
      callback(null, { templates: o.templates.list().map(templateInfo) });
    },
  };
  return {
    implementation,
    async stop() {
      stopping = true;
      const inFlight = [...building.values()];
      for (const b of inFlight) b.abort.abort(new OrchestratorStopping());
      await Promise.all(inFlight.map((b) => b.finished));
    },
  };
}

export function templateInfo(entry: TemplateEntry): TemplateInfo {
  return {
    templateId: entry.templateId,
    buildId: entry.buildId,
    createdAt: entry.createdAt,
    rootfsBytes: entry.rootfsBytes ?? 0,
    memoryBytes: entry.memoryBytes ?? 0,
  };
}
