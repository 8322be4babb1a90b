//! `logical` mode's replication connection: `START_REPLICATION` over PostgreSQL's streaming
//! protocol, which tokio-postgres does not speak (a connection with `replication=database`
//! answers it with a `CopyBoth` stream).
//!
//! The walsender decodes the WAL while it is written and sends each transaction as soon as it
//! commits, so a step reads what is already here instead of asking the server to decode from
//! the slot's restart position and materialize the result (what a peek does). A task owns the
//! socket: it passes the decoded messages to the session through a channel bounded in messages
//! and bytes (so memory stays bounded and the walsender waits when the target is slower), answers the server's
//! keepalives, and reports the position the target holds, which is what moves the slot.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256},
    },
    message::frontend,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};
use tokio_postgres::{
    config::{Host, SslMode},
    tls::{MakeTlsConnect, TlsConnect},
    Config,
};

use crate::{
    database::Tls,
    error::{Error, ErrorKind},
    position::Position,
    sql::quote_ident,
};

/// Decoded messages waiting for the session, at most. A message is one change (or a begin,
/// commit or relation); the walsender waits for room.
const QUEUE: usize = 4096;
/// The size of the messages waiting for the session, at most (the last one let in may pass
/// it): with [`QUEUE`] it bounds the memory held for a target slower than the source whatever
/// the rows' size (4,096 changes of 1 MB rows would hold 4 GB).
const QUEUE_BYTES: usize = 64 << 20;
/// How often the position is reported even when nothing changed: the server ends a connection
/// that said nothing for `wal_sender_timeout` (60 s by default).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// What the replication connection passes on.
#[derive(Debug)]
pub(crate) enum Frame {
    /// One `pgoutput` message.
    Data(Bytes),
    /// The walsender has sent every transaction that committed before this position.
    Sent(Position),
}

/// The size of the messages in the queue, and a signal when the session took one.
#[derive(Debug, Default)]
struct Queued {
    bytes: AtomicUsize,
    taken: Notify,
}

/// An open replication stream. Dropping it closes the connection.
pub(crate) struct ReplicationStream {
    frames: mpsc::Receiver<Result<Frame, Error>>,
    queued: Arc<Queued>,
    /// The position the target holds, reported to the server as written, flushed and applied.
    held: watch::Sender<Position>,
    task: JoinHandle<()>,
    /// `Relation` messages are sent once per connection: their mapping outlives a step.
    pub(crate) relations: super::logical::Relations,
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the next frame is waited for or only taken when it is already here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    Yes,
    No,
}

impl ReplicationStream {
    /// The next frame: `None` when none is here and `wait` is [`Wait::No`].
    pub(crate) async fn next(&mut self, wait: Wait) -> Result<Option<Frame>, Error> {
        let frame = match wait {
            Wait::Yes => self.frames.recv().await,
            Wait::No => match self.frames.try_recv() {
                Ok(frame) => Some(frame),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            },
        };
        if let Some(Ok(Frame::Data(body))) = &frame {
            self.queued.bytes.fetch_sub(body.len(), Ordering::AcqRel);
            self.queued.taken.notify_one();
        }
        match frame {
            Some(frame) => frame.map(Some),
            None => Err(Error::new(ErrorKind::Connection)
                .with_detail("the replication connection to the primary closed")),
        }
    }

    /// Tells the server that the target holds everything up to `position`: the slot may
    /// release the WAL before it.
    pub(crate) fn hold(&self, position: Position) {
        self.held.send_if_modified(|held| {
            let moved = position > *held;
            if moved {
                *held = position;
            }
            moved
        });
    }
}

/// What a replication connection needs from the endpoint's settings.
pub(crate) struct Endpoint {
    pub(crate) config: Config,
    pub(crate) tls: Tls,
}

/// Opens a replication connection and starts streaming `slot` from `start` with the
/// `publication`. `wake` is notified when messages arrive.
pub(crate) async fn open(
    endpoint: Endpoint,
    slot: &str,
    publication: &str,
    start: Position,
    wake: Arc<Notify>,
) -> Result<ReplicationStream, Error> {
    let mut io = connect(&endpoint).await?;
    let mut reader = Reader::default();
    let config = &endpoint.config;
    let user = config.get_user().unwrap_or_default();
    let mut buf = BytesMut::new();
    let mut parameters = vec![
        ("user", user),
        ("replication", "database"),
        ("client_encoding", "UTF8"),
        // Values are decoded to text by the walsender's session: the same settings as the
        // replicator's other connections (see `run::SESSION_SETTINGS`).
        ("DateStyle", "ISO, YMD"),
        ("IntervalStyle", "postgres"),
        ("extra_float_digits", "3"),
        ("bytea_output", "hex"),
        ("lc_monetary", "C"),
        ("xmloption", "content"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgherd replicator"),
    ];
    if let Some(database) = config.get_dbname() {
        parameters.push(("database", database));
    }
    frontend::startup_message(parameters.iter().copied(), &mut buf).map_err(io_error)?;
    send(&mut io, &mut buf).await?;
    authenticate(&mut io, &mut reader, config).await?;
    let command = format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {})",
        quote_ident(slot),
        quote_literal(&quote_ident(publication)),
    );
    frontend::query(&command, &mut buf).map_err(io_error)?;
    send(&mut io, &mut buf).await?;
    loop {
        let (tag, body) = reader.message(&mut io).await?;
        match tag {
            b'W' => break,
            b'E' => return Err(server_error(&body, "starting replication")),
            // Notices and parameter reports.
            _ => {}
        }
    }
    let (sender, frames) = mpsc::channel(QUEUE);
    let (held, reported) = watch::channel(start);
    let queued = Arc::new(Queued::default());
    let task = tokio::spawn(pump(
        io,
        reader,
        sender,
        reported,
        wake,
        (Arc::clone(&queued), QUEUE_BYTES),
    ));
    Ok(ReplicationStream {
        frames,
        queued,
        held,
        task,
        relations: Default::default(),
    })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(endpoint: &Endpoint) -> Result<Box<dyn Io>, Error> {
    let config = &endpoint.config;
    let host = config
        .get_hosts()
        .first()
        .ok_or_else(|| Error::new(ErrorKind::Config).with_detail("the endpoint names no host"))?;
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let connecting = async {
        match host {
            Host::Tcp(name) => {
                let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>((Box::new(stream) as Box<dyn Io>, name.clone()))
            }
            Host::Unix(directory) => {
                let path = directory.join(format!(".s.PGSQL.{port}"));
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok((Box::new(stream) as Box<dyn Io>, String::new()))
            }
        }
    };
    let (io, name) = match config.get_connect_timeout() {
        Some(timeout) => tokio::time::timeout(*timeout, connecting)
            .await
            .map_err(|_| Error::timeout(*timeout, "opening the replication connection"))?,
        None => connecting.await,
    }
    .map_err(io_error)?;
    match (&endpoint.tls, config.get_ssl_mode()) {
        (Tls::Plain, _) | (_, SslMode::Disable) => Ok(io),
        (Tls::Rustls(make), mode) => {
            let mut io = io;
            let mut buf = BytesMut::new();
            frontend::ssl_request(&mut buf);
            send(&mut io, &mut buf).await?;
            let answer = io.read_u8().await.map_err(io_error)?;
            if answer != b'S' {
                if mode == SslMode::Prefer {
                    return Ok(io);
                }
                return Err(Error::new(ErrorKind::Connection).with_detail(
                    "the primary refused TLS on the replication connection (sslmode requires it)",
                ));
            }
            let mut make = make.clone();
            let tls = MakeTlsConnect::<Box<dyn Io>>::make_tls_connect(&mut make, &name)
                .map_err(|e| tls_error(e.into()))?;
            let stream = tls.connect(io).await.map_err(|e| tls_error(e.into()))?;
            Ok(Box::new(stream))
        }
    }
}

async fn authenticate(
    io: &mut Box<dyn Io>,
    reader: &mut Reader,
    config: &Config,
) -> Result<(), Error> {
    let mut buf = BytesMut::new();
    let password = config.get_password();
    let missing = || {
        Error::new(ErrorKind::Connection)
            .with_detail("the primary asks for a password and the endpoint has none")
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, mut body) = reader.message(io).await?;
        match tag {
            b'R' => {
                let short = || {
                    Error::new(ErrorKind::Connection)
                        .with_detail("the primary sent a malformed authentication request")
                };
                if body.len() < 4 {
                    return Err(short());
                }
                let code = body.get_i32();
                match code {
                    0 => {}
                    3 => {
                        frontend::password_message(password.ok_or_else(missing)?, &mut buf)
                            .map_err(io_error)?;
                    }
                    5 => {
                        if body.len() < 4 {
                            return Err(short());
                        }
                        let mut salt = [0; 4];
                        body.copy_to_slice(&mut salt);
                        let user = config.get_user().unwrap_or_default().as_bytes();
                        let hash = md5_hash(user, password.ok_or_else(missing)?, salt);
                        frontend::password_message(hash.as_bytes(), &mut buf).map_err(io_error)?;
                    }
                    10 => {
                        let offers_scram = body
                            .split(|b| *b == 0)
                            .any(|mechanism| mechanism == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(Error::new(ErrorKind::Connection).with_detail(
                                "the primary offers no SASL mechanism this client knows",
                            ));
                        }
                        let client = ScramSha256::new(
                            password.ok_or_else(missing)?,
                            ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut buf)
                            .map_err(io_error)?;
                        scram = Some(client);
                    }
                    11 | 12 => {
                        let client = scram.as_mut().ok_or_else(|| {
                            Error::new(ErrorKind::Connection)
                                .with_detail("the primary sent SASL data out of order")
                        })?;
                        if code == 11 {
                            client.update(&body).map_err(auth_error)?;
                            frontend::sasl_response(client.message(), &mut buf)
                                .map_err(io_error)?;
                        } else {
                            client.finish(&body).map_err(auth_error)?;
                        }
                    }
                    other => {
                        return Err(Error::new(ErrorKind::Connection).with_detail(format!(
                            "the primary asks for an authentication method this client does \
                             not support (code {other})"
                        )))
                    }
                }
                if !buf.is_empty() {
                    send(io, &mut buf).await?;
                }
            }
            b'E' => return Err(server_error(&body, "opening the replication connection")),
            b'Z' => return Ok(()),
            // Parameter statuses, the backend key, notices.
            _ => {}
        }
    }
}

/// The longest protocol message accepted: a value of up to 1 GiB, and its message's header.
const MAX_MESSAGE: usize = (1 << 30) + (1 << 16);

/// Reads whole protocol messages from a socket.
#[derive(Default)]
struct Reader {
    buf: BytesMut,
}

impl Reader {
    /// The next message's tag and body. Cancel-safe: a partial message stays in the buffer.
    async fn message(&mut self, io: &mut Box<dyn Io>) -> Result<(u8, Bytes), Error> {
        loop {
            if self.buf.len() >= 5 {
                let length =
                    u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                        as usize;
                // PostgreSQL sends no message past 1 GiB (its largest allocation).
                if !(4..=MAX_MESSAGE).contains(&length) {
                    return Err(Error::mapping(format!(
                        "a malformed message on the replication connection (length {length})"
                    )));
                }
                if self.buf.len() > length {
                    let mut message = self.buf.split_to(length + 1).freeze();
                    let tag = message.get_u8();
                    message.advance(4);
                    return Ok((tag, message));
                }
                self.buf.reserve(length + 1 - self.buf.len());
            }
            if self.buf.capacity() - self.buf.len() < 8192 {
                self.buf.reserve(64 << 10);
            }
            let read = io.read_buf(&mut self.buf).await.map_err(io_error)?;
            if read == 0 {
                return Err(Error::new(ErrorKind::Connection)
                    .with_detail("the primary closed the replication connection"));
            }
        }
    }
}

/// The connection's task: passes messages on, answers keepalives, reports the position held.
async fn pump(
    mut io: Box<dyn Io>,
    mut reader: Reader,
    frames: mpsc::Sender<Result<Frame, Error>>,
    mut held: watch::Receiver<Position>,
    wake: Arc<Notify>,
    (queued, limit): (Arc<Queued>, usize),
) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let outcome: Result<(), Error> = async {
        // Room in the queue first, then a message: while the session is behind, the walsender
        // waits (and the position is still reported).
        let mut room = None;
        loop {
            let (permit, tag, mut body) = tokio::select! {
                permit = make_room(&frames, &queued, limit), if room.is_none() => match permit {
                    Ok(permit) => {
                        room = Some(permit);
                        continue;
                    }
                    Err(_) => return Ok(()),
                },
                message = reader.message(&mut io), if room.is_some() => {
                    let (tag, body) = message?;
                    let Some(permit) = room.take() else { continue };
                    (permit, tag, body)
                }
                _ = tick.tick() => {
                    let position = *held.borrow_and_update();
                    report(&mut io, position).await?;
                    continue;
                }
                changed = held.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let position = *held.borrow_and_update();
                    report(&mut io, position).await?;
                    continue;
                }
            };
            match tag {
                b'd' if body.first() == Some(&b'w') && body.len() >= 25 => {
                    body.advance(25);
                    queued.bytes.fetch_add(body.len(), Ordering::AcqRel);
                    permit.send(Ok(Frame::Data(body)));
                    wake.notify_one();
                }
                b'd' if body.first() == Some(&b'k') && body.len() >= 18 => {
                    body.advance(1);
                    let end = Position::new(body.get_u64());
                    body.advance(8);
                    let reply = body.get_u8() == 1;
                    permit.send(Ok(Frame::Sent(end)));
                    if reply {
                        let position = *held.borrow();
                        report(&mut io, position).await?;
                    }
                }
                b'E' => return Err(server_error(&body, "streaming changes")),
                b'c' => {
                    return Err(Error::new(ErrorKind::Connection)
                        .with_detail("the primary ended the replication stream"))
                }
                // Notices, parameter reports.
                _ => {}
            }
        }
    }
    .await;
    if let Err(error) = outcome {
        let _ = frames.send(Err(error)).await;
    }
}

/// Waits until the queued messages are below `limit` bytes, then for a place in the queue.
async fn make_room<'a>(
    frames: &'a mpsc::Sender<Result<Frame, Error>>,
    queued: &Queued,
    limit: usize,
) -> Result<mpsc::Permit<'a, Result<Frame, Error>>, mpsc::error::SendError<()>> {
    loop {
        // Created before the check: a message taken in between still wakes it.
        let taken = queued.taken.notified();
        if queued.bytes.load(Ordering::Acquire) < limit {
            break;
        }
        taken.await;
    }
    frames.reserve().await
}

/// Sends a standby status update: the target holds everything up to `held`.
async fn report(io: &mut Box<dyn Io>, held: Position) -> Result<(), Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let mut payload = BytesMut::with_capacity(34);
    payload.extend_from_slice(b"r");
    for _ in 0..3 {
        payload.extend_from_slice(&held.lsn().to_be_bytes());
    }
    payload.extend_from_slice(&(now - POSTGRES_EPOCH_MICROS).to_be_bytes());
    payload.extend_from_slice(&[0]);
    let mut buf = BytesMut::new();
    frontend::CopyData::new(payload.freeze())
        .map_err(io_error)?
        .write(&mut buf);
    send(io, &mut buf).await
}

async fn send(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<(), Error> {
    io.write_all(buf).await.map_err(io_error)?;
    io.flush().await.map_err(io_error)?;
    buf.clear();
    Ok(())
}

/// `'...'` with quotes doubled.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The message, code and severity of an `ErrorResponse`.
fn server_error(body: &[u8], doing: &str) -> Error {
    let mut code = "";
    let mut message = "";
    for field in body.split(|b| *b == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = std::str::from_utf8(value).unwrap_or_default(),
            Some((b'M', value)) => message = std::str::from_utf8(value).unwrap_or_default(),
            _ => {}
        }
    }
    let kind = if code.starts_with("28") {
        ErrorKind::Connection
    } else {
        ErrorKind::Sql
    };
    Error::new(kind).with_detail(format!(
        "{doing} on the replication connection: {message} (SQLSTATE {code})"
    ))
}

fn io_error(error: std::io::Error) -> Error {
    Error::new(ErrorKind::Connection)
        .with_detail(format!("the replication connection failed: {error}"))
}

fn auth_error(error: std::io::Error) -> Error {
    Error::new(ErrorKind::Connection).with_detail(format!(
        "the primary's SCRAM exchange failed (is the password right?): {error}"
    ))
}

fn tls_error(error: Box<dyn std::error::Error + Send + Sync>) -> Error {
    Error::new(ErrorKind::Connection)
        .with_detail(format!("TLS on the replication connection failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_name_the_message_and_code() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        let error = server_error(body, "starting replication").to_string();
        assert!(
            error.contains("replication slot \"s\" is active for PID 7"),
            "{error}"
        );
        assert!(error.contains("55006"), "{error}");
    }

    #[actix_rt::test]
    async fn the_queue_holds_a_bounded_size_of_changes() {
        use tokio::io::AsyncWriteExt as _;
        const SIZE: usize = 1000;
        const LIMIT: usize = 4 * SIZE;
        const COUNT: usize = 50;
        let (client, mut server) = tokio::io::duplex(8192);
        let writer = tokio::spawn(async move {
            for _ in 0..COUNT {
                let mut message = vec![b'd'];
                message.extend_from_slice(&u32::try_from(4 + 25 + SIZE).unwrap().to_be_bytes());
                message.push(b'w');
                message.extend_from_slice(&[0; 24]);
                message.extend_from_slice(&[7; SIZE]);
                server.write_all(&message).await.unwrap();
            }
            server
        });
        let (sender, frames) = mpsc::channel(QUEUE);
        let (held, reported) = watch::channel(Position::new(0));
        let queued = Arc::new(Queued::default());
        let task = tokio::spawn(pump(
            Box::new(client),
            Reader::default(),
            sender,
            reported,
            Arc::new(Notify::new()),
            (Arc::clone(&queued), LIMIT),
        ));
        let mut stream = ReplicationStream {
            frames,
            queued: Arc::clone(&queued),
            held,
            task,
            relations: Default::default(),
        };
        // Nothing is taken for a while: the task stops reading at the limit (unbounded, the 50
        // messages would all be queued long before).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held_bytes = queued.bytes.load(Ordering::Acquire);
        assert!(
            (LIMIT..LIMIT + SIZE).contains(&held_bytes),
            "{held_bytes} bytes queued"
        );
        // Taking messages makes room: every one arrives.
        for _ in 0..COUNT {
            match stream.next(Wait::Yes).await.expect("frame") {
                Some(Frame::Data(body)) => assert_eq!(body.len(), SIZE),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(queued.bytes.load(Ordering::Acquire), 0);
        drop(writer.await.unwrap());
    }

    #[actix_rt::test]
    async fn malformed_messages_are_errors_not_panics() {
        use tokio::io::AsyncWriteExt as _;
        // A length past any message PostgreSQL sends: refused before anything is reserved.
        let (client, mut server) = tokio::io::duplex(64);
        let mut io: Box<dyn Io> = Box::new(client);
        server
            .write_all(&[b'd', 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let error = Reader::default()
            .message(&mut io)
            .await
            .expect_err("refused");
        assert!(error.to_string().contains("malformed"), "{error}");
        // Authentication requests too short for their code, or for an MD5 salt.
        for request in [
            &[b'R', 0, 0, 0, 6, 0, 0][..],
            &[b'R', 0, 0, 0, 9, 0, 0, 0, 5, 1],
        ] {
            let (client, mut server) = tokio::io::duplex(64);
            let mut io: Box<dyn Io> = Box::new(client);
            server.write_all(request).await.unwrap();
            let config = Config::new();
            let error = authenticate(&mut io, &mut Reader::default(), &config)
                .await
                .expect_err("refused");
            assert!(error.to_string().contains("malformed"), "{error}");
        }
    }

    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(quote_literal("\"a'b\""), "'\"a''b\"'");
    }
}
