import { GcsBackend, type GcsBackendOptions } from './gcs-backend.js';
import { LocalBackend } from './local-backend.js';
import type { StorageBackend } from './storage-backend.js';

/**
 * The backend named by `SBX_BUCKET`: `gs://bucket` for Google Cloud Storage, anything else a
 * local directory path.
 */
export function openBackend(location: string, gcs: Omit<GcsBackendOptions, 'bucket'> = {}): StorageBackend {
  if (location.startsWith('gs://')) {
    const bucket = location.slice(5).replace(/\/+$/, '');
    if (bucket.length === 0 || bucket.includes('/')) {
      throw new RangeError(`bucket location ${JSON.stringify(location)} must be gs://<bucket> without a path`);
    }
    return new GcsBackend({ ...gcs, bucket });
  }
  if (location.length === 0) throw new RangeError('bucket location is empty');
  return new LocalBackend(location);
}
