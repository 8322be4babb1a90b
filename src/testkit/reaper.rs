//! A watchdog process that removes a topology's servers and files if the process that started
//! them dies without cleaning up (a SIGKILL, an abort, a `static` never dropped).
//!
//! It is a tiny shell script reading its stdin, which is a pipe from this process. The pipe closes
//! when this process exits, however it exits; the script then kills every server whose data
//! directory lies under the topology's root and removes the root.

use std::{
    io::Write as _,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
};

use super::TestkitError;

/// Kills the servers under `$1/*/data` whose command line names that directory (the postmaster
/// and its children, which PostgreSQL puts in process groups of their own) and removes their
/// System V shared memory segments, then removes `$1`.
/// The check against `/proc/<pid>/cmdline` keeps a stale pid file from killing an unrelated process.
const SCRIPT: &str = r#"
read -r _ignored
for pidfile in "$1"/*/data/postmaster.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(head -n 1 "$pidfile")
  data=$(dirname "$pidfile")
  case "$pid" in ''|*[!0-9]*) continue ;; esac
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$data"; then
    kill -STOP "$pid" 2>/dev/null
    for stat in /proc/[0-9]*/stat; do
      read -r child _name _state parent _rest < "$stat" 2>/dev/null || continue
      [ "$parent" = "$pid" ] && kill -KILL "$child" 2>/dev/null
    done
    kill -KILL "$pid" 2>/dev/null
    # Its System V shared memory segment outlives it: remove it (seventh line: key, then id).
    shmid=$(sed -n 7p "$pidfile" | awk '{print $2}')
    case "$shmid" in ''|*[!0-9]*) ;; *) sleep 0.1; ipcrm -m "$shmid" 2>/dev/null ;; esac
  fi
done
rm -rf -- "$1"
"#;

/// The watchdog of one topology root. Dropping it ends the watch (cleaning whatever is left).
#[derive(Debug)]
pub(crate) struct Reaper {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Reaper {
    /// Starts watching `root`.
    pub(crate) fn watch(root: &Path) -> Result<Reaper, TestkitError> {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SCRIPT)
            .arg("pgherd-testkit-reaper")
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a Ctrl-C in the terminal must not kill the watchdog before the
        // process it watches has had a chance to clean up.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .spawn()
            .map_err(TestkitError::io("starting the clean-up watchdog (/bin/sh)"))?;
        let stdin = child.stdin.take();
        Ok(Reaper { child, stdin })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            // Whatever is left under the root is cleaned now; normally nothing is.
            let _ = stdin.write_all(b"done\n");
        }
        let _ = self.child.wait();
    }
}
