//! A parser for the messages of `pgoutput`, PostgreSQL's built-in logical decoding output plugin,
//! in protocol version 1 (the PostgreSQL manual, "Logical Replication Message Formats").
//!
//! The bytes come from a logical replication slot, read with
//! `SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes(slot, NULL, n,
//! 'proto_version', '1', 'publication_names', publication)`: each `data` value (a `bytea`) is one
//! message, and [`parse`] turns it into a [`Message`]. A transaction arrives as a `Begin`, the
//! `Relation` (and `Type`) descriptions of the tables it touches, sent before their first use and
//! again after they change, its row changes (`Insert`, `Update`, `Delete`, `Truncate`), and a
//! `Commit`. A row is a [`Tuple`]: one value per column, in the order of the columns of its
//! relation, in PostgreSQL's text format (or binary, when the slot is read with the `binary`
//! option).
//!
//! Every integer is big-endian and every string is NUL-terminated UTF-8. Input that does not
//! follow the format exactly (cut short, an unknown type byte, bytes left over after the message)
//! is a [`ParseError`] saying what was expected at which byte; no input makes the parser panic.
//! The streaming messages of protocol version 2 and later are refused.

use std::fmt;

use bytes::Bytes;

use super::apply::Text;

/// One decoded message.
// `Message::Message` is PostgreSQL's own name for what `pg_logical_emit_message` writes.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    /// A transaction starts (`B`).
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time, in microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
        /// The transaction id.
        xid: u32,
    },
    /// A transaction ends (`C`).
    Commit {
        /// Unused by PostgreSQL so far (always 0).
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: u64,
        /// The LSN just past the commit record.
        end_lsn: u64,
        /// Commit time, in microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
    },
    /// The description of a table that the following changes refer to (`R`).
    Relation(Relation),
    /// A row was inserted (`I`).
    Insert {
        /// The OID of the relation.
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row was updated (`U`).
    Update {
        /// The OID of the relation.
        relation: u32,
        /// The old row (`O`) or its replica identity columns (`K`, the others `Null`), when
        /// the replica identity sends them.
        old: Option<Tuple>,
        /// `old` holds only the replica identity columns (`K`).
        old_is_key_only: bool,
        /// The new row; unchanged TOASTed values are `UnchangedToast`.
        new: Tuple,
    },
    /// A row was deleted (`D`).
    Delete {
        /// The OID of the relation.
        relation: u32,
        /// The old row (`O`) or its replica identity columns (`K`, the others `Null`).
        old: Tuple,
        /// `old` holds only the replica identity columns (`K`).
        old_is_key_only: bool,
    },
    /// Relations were truncated (`T`).
    Truncate {
        /// The OIDs of the relations.
        relations: Vec<u32>,
        /// `TRUNCATE ... CASCADE`.
        cascade: bool,
        /// `TRUNCATE ... RESTART IDENTITY`.
        restart_identity: bool,
    },
    /// The transaction was first committed on another server (`O`).
    Origin {
        /// The LSN of the commit on the origin server.
        lsn: u64,
        /// The name of the origin.
        name: String,
    },
    /// The description of a non-built-in column type (`Y`).
    Type {
        /// The OID of the type.
        id: u32,
        /// Its schema (empty for `pg_catalog`).
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A message written with `pg_logical_emit_message` (`M`).
    Message {
        /// Written inside the transaction (flag bit 1), not at once.
        transactional: bool,
        /// The LSN of the message.
        lsn: u64,
        /// The prefix it was written with.
        prefix: String,
        /// Its content.
        content: Vec<u8>,
    },
}

/// The description of a table (a `Relation` message).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Relation {
    /// The OID of the relation, which row changes refer to.
    pub(crate) id: u32,
    /// Its schema (empty for `pg_catalog`).
    pub(crate) namespace: String,
    /// Its name.
    pub(crate) name: String,
    /// `relreplident`: `d` (primary key), `n` (nothing), `f` (full row) or `i` (an index).
    pub(crate) replica_identity: u8,
    /// The columns, in the order of the values of a [`Tuple`].
    pub(crate) columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Column {
    /// The column is part of the replica identity (flag bit 1).
    pub(crate) key: bool,
    /// Its name.
    pub(crate) name: String,
    /// The OID of its type.
    pub(crate) type_id: u32,
    /// Its type modifier (`atttypmod`, -1 for none).
    pub(crate) type_modifier: i32,
}

/// A tuple: one value per column, in the relation's column order.
pub(crate) type Tuple = Vec<Value>;

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// SQL `NULL` (`n`).
    Null,
    /// A TOASTed value that the update did not change, and that is not sent (`u`).
    UnchangedToast,
    /// A value in text format (`t`), sharing the message's bytes.
    Text(Text),
    /// A value in binary format (`b`).
    Binary(Vec<u8>),
}

/// A message did not follow the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    /// What was expected, at which byte, and what was found instead.
    pub(crate) reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.reason)
    }
}

impl std::error::Error for ParseError {}

/// Decodes one `pgoutput` message (protocol version 1).
pub(crate) fn parse(data: &Bytes) -> Result<Message, ParseError> {
    let mut c = Cursor {
        whole: data,
        rest: data,
        pos: 0,
    };
    // Struct fields are evaluated in the order they are written, which is the order on the wire.
    let message = match c.u8("a message type byte")? {
        b'B' => Message::Begin {
            final_lsn: c.u64("the final LSN (Int64)")?,
            commit_time: c.i64("the commit time (Int64)")?,
            xid: c.u32("the transaction id (Int32)")?,
        },
        b'C' => Message::Commit {
            flags: c.u8("the commit flags (Int8)")?,
            commit_lsn: c.u64("the commit LSN (Int64)")?,
            end_lsn: c.u64("the end LSN (Int64)")?,
            commit_time: c.i64("the commit time (Int64)")?,
        },
        b'R' => Message::Relation(Relation {
            id: c.u32("the relation OID (Int32)")?,
            namespace: c.cstr("the relation's schema")?,
            name: c.cstr("the relation's name")?,
            replica_identity: c.u8("the replica identity setting (Int8)")?,
            columns: {
                let count = c.u16("the number of columns (Int16)")?;
                (0..count)
                    .map(|_| {
                        Ok(Column {
                            key: c.u8("the column flags (Int8)")? & 1 != 0,
                            name: c.cstr("the column name")?,
                            type_id: c.u32("the column type OID (Int32)")?,
                            type_modifier: c.i32("the column type modifier (Int32)")?,
                        })
                    })
                    .collect::<Result<_, _>>()?
            },
        }),
        b'I' => {
            let relation = c.u32("the relation OID (Int32)")?;
            c.tag(b"N", "'N' (a new tuple)")?;
            Message::Insert {
                relation,
                new: c.tuple()?,
            }
        }
        b'U' => {
            let relation = c.u32("the relation OID (Int32)")?;
            let tag = c.tag(b"KON", "'K', 'O' or 'N' (an old key, old or new tuple)")?;
            let old = if tag == b'N' {
                None
            } else {
                let old = c.tuple()?;
                c.tag(b"N", "'N' (a new tuple)")?;
                Some(old)
            };
            Message::Update {
                relation,
                old,
                old_is_key_only: tag == b'K',
                new: c.tuple()?,
            }
        }
        b'D' => Message::Delete {
            relation: c.u32("the relation OID (Int32)")?,
            old_is_key_only: c.tag(b"KO", "'K' or 'O' (an old key or old tuple)")? == b'K',
            old: c.tuple()?,
        },
        b'T' => {
            let count = c.u32("the number of relations (Int32)")?;
            let options = c.u8("the truncate options (Int8)")?;
            Message::Truncate {
                relations: (0..count)
                    .map(|_| c.u32("a relation OID (Int32)"))
                    .collect::<Result<_, _>>()?,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'O' => Message::Origin {
            lsn: c.u64("the origin's commit LSN (Int64)")?,
            name: c.cstr("the origin's name")?,
        },
        b'Y' => Message::Type {
            id: c.u32("the type OID (Int32)")?,
            namespace: c.cstr("the type's schema")?,
            name: c.cstr("the type's name")?,
        },
        b'M' => Message::Message {
            transactional: c.u8("the message flags (Int8)")? & 1 != 0,
            lsn: c.u64("the message LSN (Int64)")?,
            prefix: c.cstr("the message prefix")?,
            content: {
                let length = c.length("the length of the message content (Int32)")?;
                c.bytes(length, "the message content")?.to_vec()
            },
        },
        kind @ (b'S' | b'E' | b'c' | b'A') => {
            return Err(error(format!(
                "found the streaming message type {} at byte 0, which needs protocol version 2; \
                 expected a protocol version 1 message",
                show(kind)
            )))
        }
        kind => {
            return Err(error(format!(
                "expected a message type byte (one of B, C, R, I, U, D, T, O, Y, M) at byte 0, \
                 found {}",
                show(kind)
            )))
        }
    };
    if !c.rest.is_empty() {
        return Err(error(format!(
            "expected the end of the message at byte {}, found {} more bytes",
            c.pos,
            c.rest.len()
        )));
    }
    Ok(message)
}

/// Reads a message from the front; `pos` is the offset of `rest` in the message, for errors.
struct Cursor<'a> {
    whole: &'a Bytes,
    rest: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
        let Some((taken, rest)) = self.rest.split_at_checked(n) else {
            return Err(self.cut_short(n, what));
        };
        self.rest = rest;
        self.pos += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ParseError> {
        let Some((taken, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err(self.cut_short(N, what));
        };
        self.rest = rest;
        self.pos += N;
        Ok(*taken)
    }

    fn cut_short(&self, n: usize, what: &str) -> ParseError {
        error(format!(
            "expected {what} at byte {}, but the message ends there ({} of {n} bytes present)",
            self.pos,
            self.rest.len()
        ))
    }

    fn u8(&mut self, what: &str) -> Result<u8, ParseError> {
        self.array(what).map(u8::from_be_bytes)
    }

    fn u16(&mut self, what: &str) -> Result<u16, ParseError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, ParseError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i32(&mut self, what: &str) -> Result<i32, ParseError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn i64(&mut self, what: &str) -> Result<i64, ParseError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, what: &str) -> Result<String, ParseError> {
        let Some(end) = self.rest.iter().position(|&b| b == 0) else {
            return Err(error(format!(
                "expected {what} (a NUL-terminated string) at byte {}, but no NUL follows",
                self.pos
            )));
        };
        let start = self.pos;
        let text = self.bytes(end, what)?;
        self.bytes(1, "the NUL ending a string")?;
        utf8(text, start, what)
    }

    /// An Int32 length, which must not be negative.
    fn length(&mut self, what: &str) -> Result<usize, ParseError> {
        let at = self.pos;
        let length = self.i32(what)?;
        usize::try_from(length).map_err(|_| {
            error(format!(
                "expected {what} at byte {at} to be 0 or more, found {length}"
            ))
        })
    }

    /// One byte that must be one of `allowed`.
    fn tag(&mut self, allowed: &[u8], what: &str) -> Result<u8, ParseError> {
        let at = self.pos;
        let tag = self.u8(what)?;
        if allowed.contains(&tag) {
            Ok(tag)
        } else {
            Err(error(format!(
                "expected {what} at byte {at}, found {}",
                show(tag)
            )))
        }
    }

    /// `TupleData`: an Int16 number of columns, then each value.
    fn tuple(&mut self) -> Result<Tuple, ParseError> {
        let count = self.u16("the number of columns of a tuple (Int16)")?;
        (0..count)
            .map(|_| {
                let at = self.pos;
                match self.u8("a column value kind")? {
                    b'n' => Ok(Value::Null),
                    b'u' => Ok(Value::UnchangedToast),
                    b't' => {
                        let length = self.length("the length of a text value (Int32)")?;
                        let start = self.pos;
                        self.bytes(length, "a text value")?;
                        Text::new(self.whole.slice(start..start + length))
                            .map(Value::Text)
                            .map_err(|e| not_utf8(e, start, "a text value"))
                    }
                    b'b' => {
                        let length = self.length("the length of a binary value (Int32)")?;
                        Ok(Value::Binary(
                            self.bytes(length, "a binary value")?.to_vec(),
                        ))
                    }
                    kind => Err(error(format!(
                        "expected a column value kind ('n', 'u', 't' or 'b') at byte {at}, \
                         found {}",
                        show(kind)
                    ))),
                }
            })
            .collect()
    }
}

fn utf8(bytes: &[u8], start: usize, what: &str) -> Result<String, ParseError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|e| not_utf8(e, start, what))
}

fn not_utf8(e: std::str::Utf8Error, start: usize, what: &str) -> ParseError {
    error(format!(
        "expected {what} in UTF-8 at byte {start}, found an invalid byte at byte {}",
        start + e.valid_up_to()
    ))
}

fn error(reason: String) -> ParseError {
    ParseError { reason }
}

/// A byte for an error message: `'N'`, or `0x00` when it is not a printable character.
fn show(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        format!("0x{byte:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data: &[u8]) -> Result<Message, ParseError> {
        super::parse(&bytes::Bytes::copy_from_slice(data))
    }

    /// Builds a message field by field, big-endian.
    struct Bytes(Vec<u8>);

    impl Bytes {
        fn new(kind: u8) -> Bytes {
            Bytes(vec![kind])
        }
        fn u8(mut self, v: u8) -> Bytes {
            self.0.push(v);
            self
        }
        fn u16(self, v: u16) -> Bytes {
            self.raw(&v.to_be_bytes())
        }
        fn u32(self, v: u32) -> Bytes {
            self.raw(&v.to_be_bytes())
        }
        fn u64(self, v: u64) -> Bytes {
            self.raw(&v.to_be_bytes())
        }
        fn i32(self, v: i32) -> Bytes {
            self.raw(&v.to_be_bytes())
        }
        fn i64(self, v: i64) -> Bytes {
            self.raw(&v.to_be_bytes())
        }
        fn cstr(self, s: &str) -> Bytes {
            self.raw(s.as_bytes()).u8(0)
        }
        fn raw(mut self, bytes: &[u8]) -> Bytes {
            self.0.extend_from_slice(bytes);
            self
        }
        /// A `t` value.
        fn text(self, s: &str) -> Bytes {
            let length = i32::try_from(s.len()).expect("short");
            self.u8(b't').i32(length).raw(s.as_bytes())
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn text(s: &str) -> Value {
        Value::Text(Text::from(s))
    }

    fn reason(data: &[u8]) -> String {
        parse(data).expect_err("malformed").reason
    }

    /// Captured from PostgreSQL 15 (`pg_logical_slot_peek_binary_changes`, proto_version 1).
    fn captured() -> Vec<(Vec<u8>, Message)> {
        vec![
            (
                hex("49000040004e000374000000013374000000016374000000017a"),
                Message::Insert {
                    relation: 0x4000,
                    new: vec![text("3"), text("c"), text("z")],
                },
            ),
            (
                hex("55000040004e00037400000001337400000002633274000000017a"),
                Message::Update {
                    relation: 0x4000,
                    old: None,
                    old_is_key_only: false,
                    new: vec![text("3"), text("c2"), text("z")],
                },
            ),
            (
                hex("44000040004b00037400000001336e6e"),
                Message::Delete {
                    relation: 0x4000,
                    old: vec![text("3"), Value::Null, Value::Null],
                    old_is_key_only: true,
                },
            ),
            (
                hex("4200000000015294c0000303c71d4fb7e3000002d8"),
                Message::Begin {
                    final_lsn: 0x15294c0,
                    xid: 0x2d8,
                    commit_time: 0x0003_03c7_1d4f_b7e3,
                },
            ),
        ]
    }

    /// One or more well-formed messages of every type, built field by field.
    fn built() -> Vec<(Vec<u8>, Message)> {
        let relation = Relation {
            id: 16385,
            namespace: "public".to_owned(),
            name: "items".to_owned(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    key: true,
                    name: "id".to_owned(),
                    type_id: 23,
                    type_modifier: -1,
                },
                Column {
                    key: false,
                    name: "label".to_owned(),
                    type_id: 1043,
                    type_modifier: 68,
                },
                Column {
                    key: false,
                    name: "body".to_owned(),
                    type_id: 25,
                    type_modifier: -1,
                },
            ],
        };
        vec![
            (
                Bytes::new(b'B').u64(0x16_B374_D848).i64(-5).u32(7).0,
                Message::Begin {
                    final_lsn: 0x16_B374_D848,
                    commit_time: -5,
                    xid: 7,
                },
            ),
            (
                Bytes::new(b'C').u8(0).u64(100).u64(164).i64(1_000_000).0,
                Message::Commit {
                    flags: 0,
                    commit_lsn: 100,
                    end_lsn: 164,
                    commit_time: 1_000_000,
                },
            ),
            (
                Bytes::new(b'R')
                    .u32(16385)
                    .cstr("public")
                    .cstr("items")
                    .u8(b'd')
                    .u16(3)
                    .u8(1)
                    .cstr("id")
                    .u32(23)
                    .i32(-1)
                    .u8(0)
                    .cstr("label")
                    .u32(1043)
                    .i32(68)
                    .u8(0)
                    .cstr("body")
                    .u32(25)
                    .i32(-1)
                    .0,
                Message::Relation(relation),
            ),
            (
                Bytes::new(b'I')
                    .u32(16385)
                    .u8(b'N')
                    .u16(4)
                    .text("1")
                    .u8(b'n')
                    .u8(b'b')
                    .i32(2)
                    .raw(&[0, 0xff])
                    .text("")
                    .0,
                Message::Insert {
                    relation: 16385,
                    new: vec![
                        text("1"),
                        Value::Null,
                        Value::Binary(vec![0, 0xff]),
                        text(""),
                    ],
                },
            ),
            (
                Bytes::new(b'U')
                    .u32(16385)
                    .u8(b'K')
                    .u16(3)
                    .text("1")
                    .u8(b'n')
                    .u8(b'n')
                    .u8(b'N')
                    .u16(3)
                    .text("2")
                    .text("b")
                    .u8(b'u')
                    .0,
                Message::Update {
                    relation: 16385,
                    old: Some(vec![text("1"), Value::Null, Value::Null]),
                    old_is_key_only: true,
                    new: vec![text("2"), text("b"), Value::UnchangedToast],
                },
            ),
            (
                Bytes::new(b'U')
                    .u32(16385)
                    .u8(b'O')
                    .u16(1)
                    .text("é")
                    .u8(b'N')
                    .u16(1)
                    .text("ü")
                    .0,
                Message::Update {
                    relation: 16385,
                    old: Some(vec![text("é")]),
                    old_is_key_only: false,
                    new: vec![text("ü")],
                },
            ),
            (
                Bytes::new(b'D')
                    .u32(16385)
                    .u8(b'O')
                    .u16(2)
                    .text("1")
                    .u8(b'n')
                    .0,
                Message::Delete {
                    relation: 16385,
                    old: vec![text("1"), Value::Null],
                    old_is_key_only: false,
                },
            ),
            (
                Bytes::new(b'T').u32(2).u8(1).u32(16385).u32(16390).0,
                Message::Truncate {
                    relations: vec![16385, 16390],
                    cascade: true,
                    restart_identity: false,
                },
            ),
            (
                Bytes::new(b'T').u32(2).u8(2).u32(16385).u32(16390).0,
                Message::Truncate {
                    relations: vec![16385, 16390],
                    cascade: false,
                    restart_identity: true,
                },
            ),
            (
                Bytes::new(b'O').u64(0xABCD).cstr("pg_16400").0,
                Message::Origin {
                    lsn: 0xABCD,
                    name: "pg_16400".to_owned(),
                },
            ),
            (
                Bytes::new(b'Y').u32(16399).cstr("public").cstr("mood").0,
                Message::Type {
                    id: 16399,
                    namespace: "public".to_owned(),
                    name: "mood".to_owned(),
                },
            ),
            (
                Bytes::new(b'M')
                    .u8(1)
                    .u64(42)
                    .cstr("pgherd")
                    .i32(3)
                    .raw(b"a\0b")
                    .0,
                Message::Message {
                    transactional: true,
                    lsn: 42,
                    prefix: "pgherd".to_owned(),
                    content: b"a\0b".to_vec(),
                },
            ),
            (
                Bytes::new(b'M').u8(0).u64(43).cstr("").i32(0).0,
                Message::Message {
                    transactional: false,
                    lsn: 43,
                    prefix: String::new(),
                    content: Vec::new(),
                },
            ),
        ]
    }

    fn all() -> Vec<(Vec<u8>, Message)> {
        captured().into_iter().chain(built()).collect()
    }

    #[test]
    fn parses_messages_captured_from_postgres_15() {
        for (data, expected) in captured() {
            assert_eq!(parse(&data), Ok(expected));
        }
    }

    #[test]
    fn parses_every_message_type() {
        for (data, expected) in built() {
            assert_eq!(parse(&data), Ok(expected));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (data, _) in all() {
            for end in 0..data.len() {
                assert!(parse(&data[..end]).is_err(), "{:02x?}", &data[..end]);
            }
        }
        assert_eq!(
            reason(&[]),
            "expected a message type byte at byte 0, but the message ends there (0 of 1 bytes \
             present)"
        );
        assert_eq!(
            reason(&hex("49000040004e0003740000000133740000")),
            "expected the length of a text value (Int32) at byte 15, but the message ends there \
             (2 of 4 bytes present)"
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for (mut data, _) in all() {
            let end = data.len();
            data.push(0);
            assert_eq!(
                reason(&data),
                format!("expected the end of the message at byte {end}, found 1 more bytes")
            );
        }
    }

    #[test]
    fn unknown_and_streaming_message_types_are_errors() {
        assert_eq!(
            reason(b"Z"),
            "expected a message type byte (one of B, C, R, I, U, D, T, O, Y, M) at byte 0, \
             found 'Z'"
        );
        assert!(reason(&[0]).contains("found 0x00"));
        for kind in [b'S', b'E', b'c', b'A'] {
            let data = Bytes::new(kind).u32(1).u8(1).0;
            let reason = reason(&data);
            assert!(reason.contains("streaming message type"), "{reason}");
            assert!(
                reason.contains(&format!("'{}'", char::from(kind))),
                "{reason}"
            );
        }
    }

    #[test]
    fn unknown_tuple_markers_are_errors() {
        let data = Bytes::new(b'I').u32(1).u8(b'N').u16(2).u8(b'n').u8(b'x').0;
        assert_eq!(
            reason(&data),
            "expected a column value kind ('n', 'u', 't' or 'b') at byte 9, found 'x'"
        );
        let data = Bytes::new(b'I').u32(1).u8(b'O').u16(0).0;
        assert_eq!(
            reason(&data),
            "expected 'N' (a new tuple) at byte 5, found 'O'"
        );
        let data = Bytes::new(b'D').u32(1).u8(b'N').u16(0).0;
        assert!(reason(&data).starts_with("expected 'K' or 'O'"));
        let data = Bytes::new(b'U').u32(1).u8(b'K').u16(0).u8(b'K').u16(0).0;
        assert!(reason(&data).contains("at byte 8, found 'K'"));
    }

    #[test]
    fn an_unchanged_toast_value_is_kept_apart() {
        let data = Bytes::new(b'U').u32(9).u8(b'N').u16(2).text("1").u8(b'u').0;
        assert_eq!(
            parse(&data),
            Ok(Message::Update {
                relation: 9,
                old: None,
                old_is_key_only: false,
                new: vec![text("1"), Value::UnchangedToast],
            })
        );
    }

    #[test]
    fn truncate_options() {
        let truncate = |options| parse(&Bytes::new(b'T').u32(2).u8(options).u32(5).u32(6).0);
        let expected = |cascade, restart_identity| {
            Ok(Message::Truncate {
                relations: vec![5, 6],
                cascade,
                restart_identity,
            })
        };
        assert_eq!(truncate(0), expected(false, false));
        assert_eq!(truncate(1), expected(true, false));
        assert_eq!(truncate(2), expected(false, true));
        assert_eq!(truncate(3), expected(true, true));
    }

    #[test]
    fn a_relation_lists_its_columns_in_order() {
        let (data, _) = &built()[2];
        let Ok(Message::Relation(relation)) = parse(data) else {
            panic!("not a relation: {:?}", parse(data));
        };
        assert_eq!(
            (relation.namespace.as_str(), relation.name.as_str()),
            ("public", "items")
        );
        let columns: Vec<_> = relation
            .columns
            .iter()
            .map(|c| (c.key, c.name.as_str(), c.type_id, c.type_modifier))
            .collect();
        assert_eq!(
            columns,
            [
                (true, "id", 23, -1),
                (false, "label", 1043, 68),
                (false, "body", 25, -1)
            ]
        );
    }

    #[test]
    fn strings_and_lengths_are_checked() {
        // No NUL after the origin's name.
        assert_eq!(
            reason(&Bytes::new(b'O').u64(1).raw(b"abc").0),
            "expected the origin's name (a NUL-terminated string) at byte 9, but no NUL follows"
        );
        // Invalid UTF-8 in a string and in a text value.
        assert_eq!(
            reason(&Bytes::new(b'Y').u32(1).cstr("ok").raw(b"a\xffb\0").0),
            "expected the type's name in UTF-8 at byte 8, found an invalid byte at byte 9"
        );
        let data = Bytes::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(2)
            .raw(b"\xc3(")
            .0;
        assert_eq!(
            reason(&data),
            "expected a text value in UTF-8 at byte 13, found an invalid byte at byte 13"
        );
        // A negative length, and one far beyond the message.
        let data = Bytes::new(b'I').u32(1).u8(b'N').u16(1).u8(b'b').i32(-1).0;
        assert_eq!(
            reason(&data),
            "expected the length of a binary value (Int32) at byte 9 to be 0 or more, found -1"
        );
        let data = Bytes::new(b'M').u8(0).u64(1).cstr("p").i32(i32::MAX).0;
        assert!(reason(&data).contains("(0 of 2147483647 bytes present)"));
    }

    #[test]
    fn no_corruption_makes_it_panic() {
        for (data, _) in all() {
            for at in 0..data.len() {
                for byte in [0x00, 0x01, 0x7f, 0x80, 0xff, b'n', b't', b'u', b'N', b'K'] {
                    let mut corrupt = data.clone();
                    corrupt[at] = byte;
                    let _ = parse(&corrupt);
                }
            }
        }
    }

    #[test]
    fn displays_the_reason() {
        let error = parse(b"").expect_err("empty");
        assert!(error
            .to_string()
            .starts_with("malformed pgoutput message: expected a message type byte"));
        let _: &dyn std::error::Error = &error;
    }
}
