//! What can be wrong with a settings file, said so that the reader can fix it.

use std::fmt;

/// One problem found in the settings: the key it is about and what is wrong with it.
///
/// The message names the bad value (never a password) and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsProblem {
    key: String,
    message: String,
}

impl SettingsProblem {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key the problem is about, e.g. `endpoints.primary.port`.
    ///
    /// Problems that are about the file as a whole (it is missing, or is not TOML) use the key `file`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong and what would be accepted.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SettingsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

/// Settings that could not be loaded or did not pass validation.
///
/// It lists every problem found, not only the first one. It deliberately carries no `source()`:
/// the underlying `config` errors can quote the offending value, and that value may be a password.
#[derive(Debug, Clone)]
pub struct SettingsError {
    origin: String,
    problems: Vec<SettingsProblem>,
}

impl SettingsError {
    pub(crate) fn new(origin: impl Into<String>, problems: Vec<SettingsProblem>) -> Self {
        Self {
            origin: origin.into(),
            problems,
        }
    }

    /// Every problem found, in the order they were found.
    pub fn problems(&self) -> &[SettingsProblem] {
        &self.problems
    }

    /// The keys the problems are about.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.problems.iter().map(SettingsProblem::key)
    }

    /// Whether one of the problems is about `key` (an exact, dotted key).
    pub fn mentions(&self, key: &str) -> bool {
        self.keys().any(|k| k == key)
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "invalid settings in {} ({count} problem{})",
            self.origin,
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SettingsError {}

/// Turns a `config` error into problems that name the key, without ever quoting a password.
pub(crate) fn from_config_error(error: &config::ConfigError) -> SettingsProblem {
    use config::ConfigError as E;
    match error {
        E::NotFound(key) => SettingsProblem::new(
            key.clone(),
            "is required but missing: add it to the file or set it through the environment",
        ),
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let key = key.clone().unwrap_or_else(|| "file".to_owned());
            let found = if is_secret_key(&key) {
                "a value of the wrong type".to_owned()
            } else {
                unexpected.to_string()
            };
            let from = origin
                .as_deref()
                .map(|o| format!(" (from {o})"))
                .unwrap_or_default();
            SettingsProblem::new(key, format!("found {found}{from}, expected {expected}"))
        }
        E::At { error, key, .. } => match (error.as_ref(), key) {
            (E::Message(message), key) => keyed_message(key.as_deref().unwrap_or(""), message),
            (inner, Some(key)) => {
                SettingsProblem::new(key.clone(), from_config_error(inner).message)
            }
            (inner, None) => from_config_error(inner),
        },
        E::Message(message) => keyed_message("", message),
        E::FileParse { uri, cause } => SettingsProblem::new(
            "file",
            format!(
                "{} is not valid TOML: {}",
                uri.as_deref().unwrap_or("the settings text"),
                summarize_parse_error(&cause.to_string())
            ),
        ),
        other => SettingsProblem::new("file", redact_line(&other.to_string())),
    }
}

/// Attaches a deserializer message to `key`, turning "unknown field `x`" into a problem about `key.x`.
fn keyed_message(key: &str, message: &str) -> SettingsProblem {
    let join = |field: &str| {
        if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let expected = expected.trim_start_matches(", ");
            let mut text = format!("unknown key ({expected})");
            if key.is_empty() {
                text.push_str(&format!(
                    "; if it comes from the environment variable PGHERD_{}, rename or unset it: \
                     every PGHERD_* variable is read as a setting",
                    field.to_uppercase()
                ));
            }
            return SettingsProblem::new(join(field), text);
        }
    }
    let key = if key.is_empty() { "file" } else { key };
    let message = if is_secret_key(key) {
        "has an invalid value (not shown: it is a secret)".to_owned()
    } else {
        message.to_owned()
    };
    SettingsProblem::new(key, message)
}

/// Whether the value at `key` is a secret that must never be quoted.
pub(crate) fn is_secret_key(key: &str) -> bool {
    key == "password" || key.ends_with(".password")
}

/// Keeps the position and the parser's complaint of a TOML error, dropping the quoted source line,
/// which could hold a password.
fn summarize_parse_error(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let position = lines.next().unwrap_or("parse error");
    let is_excerpt = |line: &&str| {
        line.starts_with('|')
            || line.starts_with('^')
            || line.contains(" | ")
            || line.chars().next().is_some_and(|c| c.is_ascii_digit())
    };
    let complaint = lines.rfind(|line| !is_excerpt(line)).unwrap_or("");
    let position = position.trim_start_matches("TOML parse error at ");
    if complaint.is_empty() {
        position.to_owned()
    } else {
        format!("{position}: {complaint}")
    }
}

fn redact_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_keep_position_and_complaint_but_not_the_source_line() {
        let text = "TOML parse error at line 4, column 12\n  |\n4 | password = \"hunter2\n  |            ^\nunterminated string\n";
        let summary = summarize_parse_error(text);
        assert_eq!(summary, "line 4, column 12: unterminated string");
        assert!(!summary.contains("hunter2"));
    }

    #[test]
    fn unknown_top_level_field_mentions_the_environment() {
        let problem = keyed_message("", "unknown field `log`, expected `endpoints` or `pool`");
        assert_eq!(problem.key(), "log");
        assert!(problem.message().contains("PGHERD_LOG"));
    }

    #[test]
    fn unknown_nested_field_is_reported_at_its_full_key() {
        let problem = keyed_message(
            "endpoints.primary",
            "unknown field `prot`, expected one of `host`, `port`",
        );
        assert_eq!(problem.key(), "endpoints.primary.prot");
        assert!(problem.message().contains("`port`"));
    }
}
