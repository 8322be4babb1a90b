//! Quoting for the few places where SQL text must be built from names and values (DDL, which
//! takes no bound parameters). Identifiers are always quoted, never pasted.

/// `name` as a quoted SQL identifier: `"name"`, with embedded quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `value` as a quoted SQL string literal: `'value'`, with embedded quotes doubled.
///
/// Uses the standard-conforming form (no backslash escapes), which is what PostgreSQL reads with
/// its default `standard_conforming_strings = on`.
pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_escaped() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn literals_are_quoted_and_escaped() {
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
