import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { VmmSimProcess } from './vmm-sim-process.js';

// The guest inside a net-agent-style slot: a throwaway namespace this test creates with a
// persistent tap0 at 169.254.0.22/30 (as net-agent leaves it). The double runs in it via
// `ip netns exec`, as the orchestrator runs Firecracker, and must put the guest at
// 169.254.0.21 behind tap0, then give the slot back as it found it.

const ns = `vmmsim-t${process.pid}-${Math.floor(Math.random() * 1e6)}`;
let dir: string;
const procs: VmmSimProcess[] = [];

function inSlot(...argv: string[]): string {
  return execFileSync('ip', ['netns', 'exec', ns, ...argv], { encoding: 'utf8' });
}

interface Link {
  ifname: string;
  flags: string[];
  mtu: number;
  linkinfo?: { info_kind?: string; info_data?: { type?: string; persist?: boolean } };
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

function links(): Link[] {
  return JSON.parse(inSlot('ip', '-d', '-j', 'addr', 'show')) as Link[];
}

function tap0(): Link | undefined {
  return links().find((l) => l.ifname === 'tap0');
}

function expectSlotAsNetAgentLeftIt(mtu = 1400): void {
  const tap = tap0();
  expect(tap?.linkinfo?.info_kind).toBe('tun');
  expect(tap?.linkinfo?.info_data?.type).toBe('tap');
  expect(tap?.flags).toContain('UP');
  expect(tap?.mtu).toBe(mtu);
  expect(tap?.addr_info?.filter((a) => a.family === 'inet').map((a) => `${a.local}/${a.prefixlen}`)).toEqual([
    '169.254.0.22/30',
  ]);
  expect(
    links()
      .map((l) => l.ifname)
      .sort(),
  ).toEqual(['lo', 'tap0']);
}

/** The HTTP status the guest agent answers from inside the slot, or 000 when nothing answers. */
function guestStatus(path: string, maxSeconds = 3): string {
  const url = `http://169.254.0.21:49983${path}`;
  try {
    return inSlot('curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', String(maxSeconds), url);
  } catch (err) {
    return String((err as { stdout?: string }).stdout ?? '000');
  }
}

async function bootInSlot(name: string, wrapper: string[] = []): Promise<VmmSimProcess> {
  const vmm = await VmmSimProcess.start(
    join(dir, `${name}.sock`),
    ['--level', 'Warn'],
    [...wrapper, 'ip', 'netns', 'exec', ns],
  );
  procs.push(vmm);
  await vmm.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
  await vmm.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 8 });
  await vmm.ok('PUT', '/network-interfaces/eth0', {
    iface_id: 'eth0',
    host_dev_name: 'tap0',
    guest_mac: '02:fc:00:00:00:05',
  });
  await vmm.ok('PUT', '/actions', { action_type: 'InstanceStart' });
  return vmm;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-slot-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
  execFileSync('ip', ['netns', 'add', ns]);
  inSlot('ip', 'link', 'set', 'lo', 'up');
  inSlot('ip', 'tuntap', 'add', 'dev', 'tap0', 'mode', 'tap');
  inSlot('ip', 'link', 'set', 'tap0', 'mtu', '1400');
  inSlot('ip', 'addr', 'add', '169.254.0.22/30', 'dev', 'tap0');
  inSlot('ip', 'link', 'set', 'tap0', 'up');
});

afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.stop('SIGKILL')));
});

afterAll(() => {
  try {
    execFileSync('ip', ['netns', 'del', ns]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

describe('guest network in a slot', () => {
  it('answers at the guest address behind tap0, and restores the tap on SIGTERM', async () => {
    expectSlotAsNetAgentLeftIt();
    const vmm = await bootInSlot('a');
    expect(tap0()?.linkinfo?.info_kind).toBe('veth');
    expect(tap0()?.addr_info?.find((a) => a.family === 'inet')?.local).toBe('169.254.0.22');
    expect(guestStatus('/health')).toBe('204');
    // The guest's own side: eth0 with the guest address and a default route via the tap,
    // in a namespace held only by the VMM (no name under /run/netns).
    expect(execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })).not.toMatch(/guest/);
    expect(inSlot('ip', 'neigh', 'show', 'dev', 'tap0')).toMatch(/169\.254\.0\.21/);
    expect(await vmm.stop('SIGTERM')).toBe(0);
    expectSlotAsNetAgentLeftIt();
    expect(guestStatus('/health', 1)).toBe('000');
  });

  it('after SIGKILL the veth pair dies with the guest namespace; the next VMM in the slot still works and restores the tap', async () => {
    const killed = await bootInSlot('b');
    expect(guestStatus('/health')).toBe('204');
    await killed.stop('SIGKILL');
    // The kernel tears the guest namespace down asynchronously; the veth pair goes with it.
    await eventually(() => tap0() === undefined, { what: 'the veth pair to go' });
    expect(links().map((l) => l.ifname)).toEqual(['lo']);
    const next = await bootInSlot('c');
    expect(guestStatus('/health')).toBe('204');
    expect(await next.stop('SIGTERM')).toBe(0);
    // The killed VMM could not say what MTU the tap had, so the tap comes back with the default.
    expectSlotAsNetAgentLeftIt(1500);
  });

  it("runs under the seed's start script wrapping (own PID and mount namespaces)", async () => {
    // fc/process.go: unshare -pfm --kill-child -- bash -c '... ip netns exec <ns> firecracker --api-sock ...'
    const vmm = await bootInSlot('d', ['unshare', '-pfm', '--kill-child', '--']);
    expect(tap0()?.linkinfo?.info_kind).toBe('veth');
    expect(guestStatus('/health')).toBe('204');
    await vmm.stop('SIGKILL');
    await eventually(() => tap0() === undefined, { what: 'the veth pair to go' });
    // Put the slot back for whoever runs next.
    const next = await bootInSlot('e');
    expect(await next.stop('SIGTERM')).toBe(0);
    expectSlotAsNetAgentLeftIt(1500);
  });

  it("is reached through the slot's NAT: host IP → DNAT → guest, as the node reaches a sandbox", async () => {
    // A stand-in for the host side, in a second throwaway namespace: veth to the slot's eth0 on
    // a /31, a route to the sandbox's host IP via the slot, and in the slot the DNAT/SNAT pair of
    // DESIGN.md §5 (the rules net-agent installs).
    const host = `${ns}-h`;
    execFileSync('ip', ['netns', 'add', host]);
    try {
      const inHost = (...argv: string[]) => execFileSync('ip', ['netns', 'exec', host, ...argv], { encoding: 'utf8' });
      inHost('ip', 'link', 'set', 'lo', 'up');
      inHost('ip', 'link', 'add', 'veth-1', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
      inHost('ip', 'addr', 'add', '10.12.0.1/31', 'dev', 'veth-1');
      inHost('ip', 'link', 'set', 'veth-1', 'up');
      inHost('ip', 'route', 'add', '10.11.0.5/32', 'via', '10.12.0.0');
      inSlot('ip', 'addr', 'add', '10.12.0.0/31', 'dev', 'eth0');
      inSlot('ip', 'link', 'set', 'eth0', 'up');
      inSlot('sysctl', '-qw', 'net.ipv4.ip_forward=1');
      inSlot(
        'iptables',
        '-t',
        'nat',
        '-A',
        'PREROUTING',
        '-i',
        'eth0',
        '-d',
        '10.11.0.5',
        '-j',
        'DNAT',
        '--to-destination',
        '169.254.0.21',
      );
      inSlot(
        'iptables',
        '-t',
        'nat',
        '-A',
        'POSTROUTING',
        '-o',
        'eth0',
        '-s',
        '169.254.0.21',
        '-j',
        'SNAT',
        '--to-source',
        '10.11.0.5',
      );
      const vmm = await bootInSlot('nat');
      const status = inHost(
        'curl',
        '-s',
        '-o',
        '/dev/null',
        '-w',
        '%{http_code}',
        '--max-time',
        '5',
        'http://10.11.0.5:49983/health',
      );
      expect(status).toBe('204');
      const metrics = JSON.parse(inHost('curl', '-s', '--max-time', '5', 'http://10.11.0.5:49983/metrics')) as Record<
        string,
        number
      >;
      expect(metrics['mem_total_mib']).toBe(8);
      expect(await vmm.stop('SIGTERM')).toBe(0);
      // The rules and the slot's eth0 are the test's; the double restored only its tap.
      expect(tap0()?.linkinfo?.info_kind).toBe('tun');
    } finally {
      execFileSync('ip', ['netns', 'del', host]);
      try {
        inSlot('iptables', '-t', 'nat', '-F');
      } catch {
        // the slot namespace may already be gone
      }
    }
  });
});
