import { execFile } from 'node:child_process';

/** What dig printed, parsed: enough to assert on status, flags, sections and EDNS. */
export interface DigAnswer {
  status: string;
  flags: string[];
  counts: { query: number; answer: number; authority: number; additional: number };
  question: string[];
  answers: { name: string; ttl: number; type: string; data: string }[];
  edns: { version: number; udp: number; flags: string } | null;
  raw: string;
}

/** Runs the real dig (bind9-dnsutils) against host:port. */
export function dig(server: { host: string; port: number }, args: string[]): Promise<DigAnswer> {
  return new Promise((resolve, reject) => {
    execFile(
      'dig',
      [`@${server.host}`, '-p', String(server.port), '+norec', '+time=3', '+tries=2', ...args],
      { timeout: 20_000 },
      (err, stdout) => {
        if (err) {
          reject(new Error(`dig ${args.join(' ')} failed: ${err.message}\n${stdout}`));
          return;
        }
        resolve(parseDig(stdout));
      },
    );
  });
}

export function parseDig(raw: string): DigAnswer {
  const header = /status: (\w+)/.exec(raw);
  const flagLine = /;; flags:([^;]*);\s*QUERY: (\d+), ANSWER: (\d+), AUTHORITY: (\d+), ADDITIONAL: (\d+)/.exec(raw);
  if (!header || !flagLine) throw new Error(`no DNS reply in dig output:\n${raw}`);
  const edns = /; EDNS: version: (\d+), flags:([^;]*); udp: (\d+)/.exec(raw);
  const section = (title: string): string[] => {
    const start = raw.indexOf(`;; ${title} SECTION:`);
    if (start < 0) return [];
    const lines = raw.slice(start).split('\n').slice(1);
    const out: string[] = [];
    for (const line of lines) {
      if (line.trim() === '') break;
      out.push(line.trim());
    }
    return out;
  };
  return {
    status: header[1]!,
    flags: flagLine[1]!.trim().split(/\s+/).filter(Boolean),
    counts: {
      query: Number(flagLine[2]),
      answer: Number(flagLine[3]),
      authority: Number(flagLine[4]),
      additional: Number(flagLine[5]),
    },
    question: section('QUESTION').map((l) => l.replace(/^;/, '').split(/\s+/).join(' ')),
    answers: section('ANSWER').map((line) => {
      const [name = '', ttl = '', , type = '', data = ''] = line.split(/\s+/);
      return { name, ttl: Number(ttl), type, data };
    }),
    edns: edns ? { version: Number(edns[1]), flags: edns[2]!.trim(), udp: Number(edns[3]) } : null,
    raw,
  };
}
