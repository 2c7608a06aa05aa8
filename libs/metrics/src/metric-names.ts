/**
 * Our metric names: `sbx_<service>_<what>_<unit>`, units in base units (seconds, bytes), counters
 * and only counters ending in `_total`, histograms in seconds or bytes. prom-client's runtime
 * metrics (`process_*`, `nodejs_*`) keep their standard names, which Node dashboards expect.
 */
export const RUNTIME_METRIC = /^(process|nodejs)_/;

/** Units that are not base units: a name must say seconds or bytes instead. */
const SCALED_UNIT =
  /_(ns|us|ms|micros|millis|microseconds|milliseconds|minutes|hours|kb|kib|mb|mib|gb|gib|pages4k)(_|$)/;

/** `block-server` → `sbx_block_server_`. */
export function metricPrefix(service: string): string {
  return `sbx_${service.replace(/-/g, '_')}_`;
}

/** What is wrong with a metric's name for its type, or nothing. */
export function metricNameProblems(service: string, name: string, type: string): string[] {
  if (RUNTIME_METRIC.test(name)) return [];
  const problems: string[] = [];
  const prefix = metricPrefix(service);
  if (!name.startsWith(prefix) || !/^[a-z][a-z0-9_]*[a-z0-9]$/.test(name) || name.length === prefix.length) {
    problems.push(`${name}: not sbx_<service>_<what>_<unit> for ${service} (${prefix}…)`);
  }
  if (SCALED_UNIT.test(name)) problems.push(`${name}: not in base units (seconds, bytes)`);
  if (name.endsWith('_total') !== (type === 'counter')) {
    problems.push(`${name}: a ${type}; only counters end in _total, and every counter does`);
  }
  if ((type === 'histogram' || type === 'summary') && !/_(seconds|bytes)$/.test(name)) {
    problems.push(`${name}: a ${type} must measure seconds or bytes`);
  }
  return problems;
}
