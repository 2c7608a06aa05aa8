import { z } from 'zod';
import { openBackend } from './open-backend.js';
import type { StorageBackend } from './storage-backend.js';

/**
 * The bucket settings every service that reads builds shares (orchestrator, uffd-server,
 * block-server). One definition, so the flag, its environment alias and its check are the same
 * everywhere; each service keeps its own `bucket` default.
 */
export const gcsEndpointField = z
  .string()
  .url()
  .optional()
  .describe("a GCS JSON API endpoint other than Google's (fake-gcs-server, a gateway), unauthenticated")
  .meta({ aliases: ['SBX_GCS_ENDPOINT'] });

export interface BucketSettings {
  bucket: string;
  gcsEndpoint?: string;
}

/** The backend a service's bucket settings name. */
export function openConfiguredBackend(settings: BucketSettings): StorageBackend {
  return openBackend(settings.bucket, settings.gcsEndpoint ? { apiEndpoint: settings.gcsEndpoint } : {});
}
