/**
 * Host names as the egress proxy compares them: ASCII (IDNs arrive as punycode), lower case,
 * without a trailing dot, 1-253 characters of labels of 1-63 letters, digits, `-` or `_`.
 * An IPv4 literal is not a name (such connections are judged by address).
 */
const LABEL = /^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/;
const IPV4 = /^\d{1,3}(?:\.\d{1,3}){3}$/;

/** The normalized name, or undefined when `text` is not a host name. */
export function normalizeHostName(text: string): string | undefined {
  let name = text.toLowerCase();
  if (name.endsWith('.')) name = name.slice(0, -1);
  if (name.length === 0 || name.length > 253 || IPV4.test(name)) return undefined;
  return name.split('.').every((l) => LABEL.test(l)) ? name : undefined;
}
