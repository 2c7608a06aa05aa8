import { close, pidfdOpen, watchReadable } from '#native';
import { pollingRound } from './polling-round.js';
import { isSameProcess, type ProcessIdentity } from './process-identity.js';

/**
 * Tells when a process that is not our child ends (a VMM adopted after a restart: no exit event
 * reaches us). Its pidfd turns readable when it exits, seen on the event loop with no timer, so
 * a node that adopted hundreds of VMMs does not read hundreds of /proc files a second. Where no
 * pidfd can be opened (kernel before 5.3), the process is looked at by one round per interval
 * shared by all of them (polling-round.ts). Returns the function that stops watching.
 */
export function watchProcessExit(identity: ProcessIdentity, onExit: () => void, intervalMs = 500): () => void {
  let done = false;
  let stop = () => undefined as void;
  const finish = () => {
    if (done) return;
    stop();
    done = true;
    onExit();
  };
  let pidfd = -1;
  try {
    pidfd = pidfdOpen(identity.pid);
  } catch {
    // Gone already (ESRCH) or no pidfd_open: the round below finds out.
  }
  if (pidfd >= 0) {
    const fd = pidfd;
    // Held open by the loop: the service exits on its own once stopped (serviceMain), so a VMM
    // kept running at shutdown does not keep the orchestrator.
    const watch = watchReadable(fd, finish);
    stop = () => {
      if (done) return;
      done = true;
      watch.close();
      close(fd);
    };
    // The pid may have been taken by another process before the pidfd pinned it.
    void isSameProcess(identity).then((same) => {
      if (!same) finish();
    });
  } else {
    const leave = pollingRound(intervalMs).add(() =>
      isSameProcess(identity).then((same) => {
        if (!same) finish();
      }),
    );
    stop = () => {
      if (done) return;
      done = true;
      leave();
    };
  }
  return () => stop();
}
