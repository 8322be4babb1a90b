//! Finding the system's PostgreSQL server binaries.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use super::TestkitError;

/// The programs a topology needs, all from one installation.
const REQUIRED: [&str; 3] = ["initdb", "postgres", "pg_basebackup"];

/// The directory holding one PostgreSQL installation's server programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Finds the binaries once per process: on PATH, then through `pg_config --bindir`, then under
    /// `/usr/lib/postgresql/<version>/bin` (newest version first).
    ///
    /// # Errors
    ///
    /// [`TestkitError::BinariesNotFound`] with an install hint when none is complete.
    pub fn find() -> Result<Binaries, TestkitError> {
        static FOUND: OnceLock<Result<Binaries, Vec<PathBuf>>> = OnceLock::new();
        FOUND
            .get_or_init(|| {
                let candidates = candidate_dirs();
                choose(&candidates, is_complete)
                    .map(|dir| Binaries { dir })
                    .ok_or(candidates)
            })
            .clone()
            .map_err(|searched| TestkitError::BinariesNotFound { searched })
    }

    /// The directory the programs are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of program `name` (e.g. `"initdb"`).
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn is_complete(dir: &Path) -> bool {
    REQUIRED.iter().all(|name| dir.join(name).is_file())
}

/// The first directory of `candidates` that holds every required program.
fn choose(candidates: &[PathBuf], complete: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    candidates.iter().find(|dir| complete(dir)).cloned()
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let postgres = dir.join("postgres");
            if postgres.is_file() {
                // A symlink such as /usr/local/bin/postgres may stand alone; its target's
                // directory holds the rest of the installation.
                if let Some(real_dir) = std::fs::canonicalize(&postgres)
                    .ok()
                    .and_then(|real| real.parent().map(Path::to_path_buf))
                {
                    push_unique(&mut dirs, dir.clone());
                    push_unique(&mut dirs, real_dir);
                }
            }
        }
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if !text.is_empty() {
                push_unique(&mut dirs, PathBuf::from(text));
            }
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    for (_, dir) in versioned {
        push_unique(&mut dirs, dir);
    }
    if dirs.is_empty() {
        dirs.push(PathBuf::from("/usr/lib/postgresql/<version>/bin"));
    }
    dirs
}

fn push_unique(dirs: &mut Vec<PathBuf>, dir: PathBuf) {
    if !dirs.contains(&dir) {
        dirs.push(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_the_first_complete_directory() {
        let candidates = vec![
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/usr/lib/postgresql/16/bin"),
            PathBuf::from("/usr/lib/postgresql/15/bin"),
        ];
        let chosen = choose(&candidates, |dir| {
            dir.to_string_lossy().contains("postgresql")
        });
        assert_eq!(chosen, Some(PathBuf::from("/usr/lib/postgresql/16/bin")));
        assert_eq!(choose(&candidates, |_| false), None);
    }

    #[test]
    fn the_missing_binaries_error_says_how_to_install() {
        let error = TestkitError::BinariesNotFound {
            searched: vec![PathBuf::from("/usr/lib/postgresql/<version>/bin")],
        };
        let text = error.to_string();
        assert!(text.contains("apt-get install -y postgresql"), "{text}");
    }
}
