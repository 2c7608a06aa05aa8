import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ApiFault } from './api-error.js';
import { MAX_PAYLOAD_BYTES, parseRequest } from './api-request.js';

const body = (v: unknown) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v));

function fault(fn: () => unknown): ApiFault {
  try {
    fn();
  } catch (err) {
    if (err instanceof ApiFault) return err;
    throw err;
  }
  throw new Error('expected an ApiFault');
}

// Request bodies and messages from Firecracker's own parser tests
// (src/firecracker/src/api_server/request/snapshot.rs, parsed_request.rs).
describe('Firecracker API request parsing', () => {
  it('parses snapshot load with a Uffd backend', () => {
    const action = parseRequest(
      'PUT',
      '/snapshot/load',
      body({ snapshot_path: 'foo', mem_backend: { backend_path: 'bar', backend_type: 'Uffd' }, resume_vm: true }),
    );
    expect(action).toEqual({
      kind: 'LoadSnapshot',
      params: {
        snapshotPath: 'foo',
        backendType: 'Uffd',
        backendPath: 'bar',
        enableDiffSnapshots: false,
        resumeVm: true,
        networkOverrides: [],
      },
    });
  });

  it('maps the deprecated mem_file_path to the File backend', () => {
    const action = parseRequest('PUT', '/snapshot/load', body({ snapshot_path: 'foo', mem_file_path: 'bar' }));
    expect(action).toMatchObject({ kind: 'LoadSnapshot', params: { backendType: 'File', backendPath: 'bar' } });
  });

  it('refuses mem_backend together with mem_file_path, and neither', () => {
    expect(
      fault(() =>
        parseRequest(
          'PUT',
          '/snapshot/load',
          body({
            snapshot_path: 'foo',
            mem_file_path: 'bar',
            mem_backend: { backend_path: 'bar', backend_type: 'Uffd' },
          }),
        ),
      ).faultMessage,
    ).toBe(
      'An error occurred when deserializing the json body of a request: too many fields: either `mem_backend` or `mem_file_path` exclusively is required.',
    );
    expect(fault(() => parseRequest('PUT', '/snapshot/load', body({ snapshot_path: 'foo' }))).faultMessage).toBe(
      'An error occurred when deserializing the json body of a request: missing field: either `mem_backend` or `mem_file_path` is required.',
    );
  });

  it('names missing fields the way serde does', () => {
    expect(
      fault(() =>
        parseRequest('PUT', '/snapshot/load', body({ snapshot_path: 'foo', mem_backend: { backend_path: 'bar' } })),
      ).faultMessage,
    ).toMatch(/^An error occurred when deserializing the json body of a request: missing field `backend_type`/);
    expect(
      fault(() =>
        parseRequest('PUT', '/snapshot/load', body({ mem_backend: { backend_path: 'bar', backend_type: 'Uffd' } })),
      ).faultMessage,
    ).toMatch(/missing field `snapshot_path`/);
    expect(fault(() => parseRequest('PUT', '/snapshot/load', body('{"snapshot_path": "foo",}'))).status).toBe(400);
  });

  it('parses snapshot create, Full by default', () => {
    expect(
      parseRequest(
        'PUT',
        '/snapshot/create',
        body({ snapshot_type: 'Diff', snapshot_path: 'foo', mem_file_path: 'bar' }),
      ),
    ).toEqual({ kind: 'CreateSnapshot', params: { snapshotType: 'Diff', snapshotPath: 'foo', memFilePath: 'bar' } });
    expect(parseRequest('PUT', '/snapshot/create', body({ snapshot_path: 'foo', mem_file_path: 'bar' }))).toMatchObject(
      {
        params: { snapshotType: 'Full' },
      },
    );
    expect(
      fault(() => parseRequest('PUT', '/snapshot/create', body({ invalid_field: 'foo', mem_file_path: 'bar' })))
        .faultMessage,
    ).toMatch(/unknown field `invalid_field`/);
  });

  it('parses PATCH /vm and refuses unknown states and fields', () => {
    expect(parseRequest('PATCH', '/vm', body({ state: 'Paused' }))).toEqual({ kind: 'Pause' });
    expect(parseRequest('PATCH', '/vm', body({ state: 'Resumed' }))).toEqual({ kind: 'Resume' });
    expect(fault(() => parseRequest('PATCH', '/vm', body({ invalid: 'Paused' }))).faultMessage).toMatch(
      /unknown field `invalid`/,
    );
    // Real Firecracker v1.16.1's answer (issue 18): serde's wording with the position.
    expect(fault(() => parseRequest('PATCH', '/vm', body('{"state": "Frozen"}'))).faultMessage).toBe(
      'An error occurred when deserializing the json body of a request: unknown variant `Frozen`, expected `Paused` or `Resumed` at line 1 column 18.',
    );
    expect(fault(() => parseRequest('PATCH', '/vm', body({}))).faultMessage).toBe(
      'An error occurred when deserializing the json body of a request: missing field `state` at line 1 column 2.',
    );
  });

  it('answers unknown paths and methods as Firecracker does (400, not 404)', () => {
    expect(fault(() => parseRequest('GET', '/foo', undefined)).faultMessage).toBe(
      'Invalid request method and/or path: GET foo.',
    );
    expect(fault(() => parseRequest('PUT', '/snapshot/invalid', body({}))).faultMessage).toBe(
      'Invalid request method and/or path: PUT /snapshot/invalid.',
    );
    expect(fault(() => parseRequest('PUT', '/snapshot', body({}))).faultMessage).toBe(
      'Missing snapshot operation type.',
    );
    expect(fault(() => parseRequest('DELETE', '/vm', undefined)).status).toBe(400);
  });

  it('refuses a GET with a body and an empty PUT or PATCH', () => {
    expect(fault(() => parseRequest('GET', '/mmds', body({}))).faultMessage).toBe('GET request cannot have a body.');
    expect(fault(() => parseRequest('PUT', '/actions', undefined)).faultMessage).toBe('Empty PUT request.');
    expect(fault(() => parseRequest('PATCH', '/vm', undefined)).faultMessage).toBe('Empty PATCH request.');
  });

  it('parses actions and refuses an invalid action type', () => {
    expect(parseRequest('PUT', '/actions', body({ action_type: 'InstanceStart' }))).toEqual({ kind: 'StartMicroVm' });
    expect(
      fault(() => parseRequest('PUT', '/actions', body({ action_type: 'Invalid', payload: 'string' }))).status,
    ).toBe(400);
  });

  it('checks drive and interface ids against the path', () => {
    const drive = { drive_id: 'rootfs', path_on_host: '/x', is_root_device: true, is_read_only: false };
    expect(parseRequest('PUT', '/drives/rootfs', body(drive))).toMatchObject({
      config: { driveId: 'rootfs', pathOnHost: '/x' },
    });
    expect(fault(() => parseRequest('PUT', '/drives/other', body(drive))).faultMessage).toBe(
      'The id from the path does not match the id from the body!',
    );
    expect(fault(() => parseRequest('PUT', '/drives/bad-id', body(drive))).faultMessage).toBe(
      'API Resource IDs can only contain alphanumeric characters and underscores.',
    );
    expect(fault(() => parseRequest('PUT', '/drives/', body(drive))).faultMessage).toBe('Missing drive id.');
    expect(
      parseRequest(
        'PUT',
        '/network-interfaces/eth0',
        body({ iface_id: 'eth0', host_dev_name: 'tap0', guest_mac: 'AA:FC:00:00:00:01' }),
      ),
    ).toMatchObject({ config: { ifaceId: 'eth0', hostDevName: 'tap0', guestMac: 'AA:FC:00:00:00:01' } });
  });

  it('parses machine config with Firecracker defaults and type checks', () => {
    expect(parseRequest('PUT', '/machine-config', body({ vcpu_count: 2, mem_size_mib: 512 }))).toEqual({
      kind: 'PutMachineConfig',
      config: { vcpuCount: 2, memSizeMib: 512, smt: false, trackDirtyPages: false, hugePages: 'None' },
    });
    expect(
      fault(() => parseRequest('PUT', '/machine-config', body({ vcpu_count: '2', mem_size_mib: 512 }))).faultMessage,
    ).toMatch(/invalid type: string "2", expected u8 at line 1 column 17\.$/);
    expect(fault(() => parseRequest('PUT', '/machine-config', body({ mem_size_mib: 512 }))).faultMessage).toMatch(
      /missing field `vcpu_count`/,
    );
  });

  it('accepts any JSON for MMDS and keeps it as sent', () => {
    const meta = { instanceID: 'sbx-1', envID: 'tmpl', address: 'logs', traceID: 't', teamID: 'team' };
    expect(parseRequest('PUT', '/mmds', body(meta))).toEqual({ kind: 'PutMmds', value: meta });
    expect(parseRequest('PATCH', '/mmds', body({ a: null }))).toEqual({ kind: 'PatchMmds', value: { a: null } });
    expect(parseRequest('GET', '/mmds', undefined)).toEqual({ kind: 'GetMmds' });
  });

  it('never fails with anything but an ApiFault, whatever arrives (fuzz)', () => {
    const paths = fc.constantFrom(
      '/',
      '/snapshot/load',
      '/snapshot/create',
      '/snapshot',
      '/vm',
      '/mmds',
      '/actions',
      '/drives/rootfs',
      '/network-interfaces/eth0',
      '/machine-config',
      '/boot-source',
      '/x/y/z',
    );
    const bodies = fc.oneof(
      fc.constant(undefined),
      fc.json().map((j) => Buffer.from(j)),
      fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)),
      fc
        .record(
          {
            snapshot_path: fc.anything(),
            mem_backend: fc.oneof(
              fc.anything(),
              fc.record({ backend_path: fc.anything(), backend_type: fc.anything() }),
            ),
            state: fc.anything(),
            action_type: fc.anything(),
          },
          { requiredKeys: [] },
        )
        .map((o) => Buffer.from(JSON.stringify(o) ?? 'null')),
    );
    fc.assert(
      fc.property(fc.constantFrom('GET', 'PUT', 'PATCH', 'POST'), paths, bodies, (method, path, b) => {
        try {
          parseRequest(method, path, b);
        } catch (err) {
          expect(err).toBeInstanceOf(ApiFault);
          expect((err as ApiFault).status).toBe(400);
        }
      }),
      { numRuns: 3000 },
    );
    expect(MAX_PAYLOAD_BYTES).toBe(51_200);
  });
});
