import {
  status,
  type handleUnaryCall,
  type sendUnaryData,
  type ServerUnaryCall,
  type ServiceError,
} from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { RequestInvalid, unaryHandlers } from '#service-kit';

const logger = createLogger({ service: 'test', level: 'silent' });

function call<Req, Res>(handler: handleUnaryCall<Req, Res>, request: Req) {
  let sync = true;
  const answered = new Promise<{ error: Partial<ServiceError> | null; response: Res | null; sync: boolean }>(
    (resolve) =>
      handler(
        { request } as ServerUnaryCall<Req, Res>,
        ((error: Partial<ServiceError> | null, response: Res | null) =>
          resolve({ error, response, sync })) as sendUnaryData<Res>,
      ),
  );
  sync = false;
  return answered;
}

describe('unaryHandlers', () => {
  it('answers a synchronous result at once and an asynchronous one when it settles', async () => {
    const handle = unaryHandlers({ logger });
    const now = await call(
      handle('echo', (req: { n: number }) => ({ n: req.n + 1 })),
      { n: 1 },
    );
    expect(now).toEqual({ error: null, response: { n: 2 }, sync: true });
    const later = await call(
      handle('echo', async (req: { n: number }) => ({ n: req.n * 2 })),
      { n: 4 },
    );
    expect(later).toMatchObject({ error: null, response: { n: 8 }, sync: false });
  });

  it('turns what the body throws, sync or async, into the status of the table and tells onError', async () => {
    const seen: string[] = [];
    const handle = unaryHandlers({ logger, onError: (step, err) => seen.push(`${step}: ${(err as Error).name}`) });
    const thrown = await call(
      handle('acquire', () => {
        throw new RequestInvalid('sandbox_id', 'empty');
      }),
      { sandboxId: '' },
    );
    expect(thrown.error).toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: 'acquire: invalid sandbox_id: empty',
    });
    const rejected = await call(
      handle('release', async () => {
        throw new Error('disk on fire');
      }),
      { sandboxId: 'a' },
    );
    expect(rejected.error).toMatchObject({ code: status.INTERNAL, details: 'release: disk on fire' });
    expect(seen).toEqual(['acquire: RequestInvalid', 'release: Error']);
  });
});
