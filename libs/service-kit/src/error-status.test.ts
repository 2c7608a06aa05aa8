import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { RequestInvalid, statusOf, toServiceError, TypedError } from '#service-kit';

class StepFailed extends TypedError {
  readonly code = 'SANDBOX_STEP_FAILED';
  constructor(
    readonly step: string,
    cause: unknown,
  ) {
    super(`step '${step}' failed`, { cause });
  }
}

const peerError = (code: status): ServiceError =>
  Object.assign(new Error('peer said no'), { code, details: 'peer said no', metadata: new Metadata() });

describe('the code → status table', () => {
  it('maps our errors, library errors and errno codes by their code', () => {
    expect(statusOf(new RequestInvalid('sandbox_id', 'empty'))).toBe(status.INVALID_ARGUMENT);
    expect(statusOf(Object.assign(new Error('gone'), { code: 'BUILD_NOT_FOUND' }))).toBe(status.NOT_FOUND);
    expect(statusOf(Object.assign(new Error('open'), { code: 'ENOENT' }))).toBe(status.NOT_FOUND);
    expect(statusOf(Object.assign(new Error('?'), { code: 'NO_SUCH_CODE' }))).toBe(status.INTERNAL);
    expect(statusOf(new Error('plain'))).toBe(status.INTERNAL);
    expect(statusOf('a string')).toBe(status.INTERNAL);
  });

  it("keeps a peer's status, and a wrapped cause's only when the caller can act on it", () => {
    expect(statusOf(peerError(status.FAILED_PRECONDITION))).toBe(status.FAILED_PRECONDITION);
    expect(statusOf(new StepFailed('slot', peerError(status.RESOURCE_EXHAUSTED)))).toBe(status.RESOURCE_EXHAUSTED);
    expect(statusOf(new StepFailed('device', peerError(status.INVALID_ARGUMENT)))).toBe(status.INTERNAL);
    expect(statusOf(new StepFailed('build', Object.assign(new Error('x'), { code: 'BUILD_NOT_FOUND' })))).toBe(
      status.NOT_FOUND,
    );
    expect(statusOf(new StepFailed('vmm', new Error('crashed')))).toBe(status.INTERNAL);
  });

  it('names the step in the message and gives the error its class name', () => {
    const err = new RequestInvalid('build_id', 'not a UUID');
    expect(err.name).toBe('RequestInvalid');
    expect(err.field).toBe('build_id');
    expect(toServiceError('open device', err)).toEqual({
      code: status.INVALID_ARGUMENT,
      details: 'open device: invalid build_id: not a UUID',
      message: 'open device: invalid build_id: not a UUID',
    });
  });
});
