//! The OS user the servers run as: the current user, or `postgres` when running as root
//! (PostgreSQL refuses to run as root).

use std::{os::unix::process::CommandExt as _, path::Path};

use nix::unistd::{Gid, Uid, User};

use super::TestkitError;

/// Who runs the servers, and how to hand files to them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerUser {
    /// `Some` when running as root: the ids to switch to.
    switch_to: Option<(Uid, Gid)>,
}

impl ServerUser {
    /// The current user, or the `postgres` OS user when running as root.
    pub(crate) fn detect() -> Result<ServerUser, TestkitError> {
        if !Uid::effective().is_root() {
            return Ok(ServerUser { switch_to: None });
        }
        match User::from_name("postgres") {
            Ok(Some(user)) => Ok(ServerUser {
                switch_to: Some((user.uid, user.gid)),
            }),
            _ => Err(TestkitError::NoServerUser),
        }
    }

    /// Makes `path` belong to the server user (a no-op when not running as root).
    pub(crate) fn give(&self, path: &Path) -> Result<(), TestkitError> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw())).map_err(
                TestkitError::io(format!("giving {} to the postgres user", path.display())),
            )?;
        }
        Ok(())
    }

    /// Makes `command` run as the server user, in a clean environment.
    pub(crate) fn prepare(&self, command: &mut std::process::Command) {
        command
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("TZ", "UTC");
        if let Some((uid, gid)) = self.switch_to {
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
    }
}
