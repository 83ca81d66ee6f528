//! Blocking D-Bus for one peer-to-peer connection, made for the hot path
//! of npud's private channels: the thread that calls writes the call and
//! reads the reply itself, and the thread that serves reads the call, runs
//! it and writes the reply, with nothing else in between.
//!
//! zbus's connection serves any number of callers: a reader task, a queue
//! of received messages and a wake-up of the caller's future sit between
//! the socket and the reply. On a box that has just swept its caches with
//! a model's weights, each of those steps costs cache misses; on a channel
//! with one caller at a time they buy nothing. This module speaks the same
//! D-Bus wire protocol (SASL `EXTERNAL`, Unix fd passing, zbus's own
//! message encoding), so either end may be zbus.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use zbus::zvariant::serialized::{Context, Data};
use zbus::zvariant::{DynamicType, OwnedValue, Type, LE};

/// Header field codes (D-Bus specification, "Message Format").
const FIELD_PATH: u8 = 1;
const FIELD_INTERFACE: u8 = 2;
const FIELD_MEMBER: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_SIGNATURE: u8 = 8;
const FIELD_UNIX_FDS: u8 = 9;
/// Message types.
pub const METHOD_CALL: u8 = 1;
pub const METHOD_RETURN: u8 = 2;
pub const ERROR: u8 = 3;
/// The largest message D-Bus allows.
const MAX_MESSAGE: usize = 128 << 20;
/// Bytes one `recvmsg` takes at most.
const READ_SIZE: usize = 64 * 1024;
/// File descriptors one `recvmsg` takes at most.
const MAX_FDS: usize = 16;
/// The longest handshake line taken.
const MAX_LINE: usize = 4096;

fn io(e: impl Into<std::io::Error>) -> zbus::Error {
    zbus::Error::InputOutput(std::sync::Arc::new(e.into()))
}

fn protocol(what: impl std::fmt::Display) -> zbus::Error {
    zbus::Error::Failure(format!("the peer broke the D-Bus protocol: {what}"))
}

/// Messages in and out of one authenticated connection.
#[derive(Debug)]
pub struct Wire {
    socket: UnixStream,
    /// Bytes read past the last whole message.
    buf: Vec<u8>,
    /// Where `recvmsg` reads to.
    scratch: Vec<u8>,
    /// File descriptors received and not yet claimed by a message.
    fds: VecDeque<OwnedFd>,
}

/// One message as read: the whole of it, with the file descriptors that
/// came with it, and its header fields.
pub struct Received {
    data: Data<'static, 'static>,
    fields: Vec<(u8, OwnedValue)>,
    body_at: usize,
}

impl Received {
    /// [`METHOD_CALL`], [`METHOD_RETURN`], [`ERROR`] or a signal (4).
    pub fn kind(&self) -> u8 {
        self.data[1]
    }

    /// Whether the sender waits for a reply (its `NO_REPLY_EXPECTED`
    /// flag is clear).
    pub fn expects_reply(&self) -> bool {
        self.data[2] & 0x1 == 0
    }

    pub fn serial(&self) -> u32 {
        u32::from_le_bytes(self.data[8..12].try_into().expect("4 bytes"))
    }

    pub fn reply_serial(&self) -> Option<u32> {
        self.field(FIELD_REPLY_SERIAL)
    }

    pub fn path(&self) -> Option<String> {
        self.field::<zbus::zvariant::OwnedObjectPath>(FIELD_PATH)
            .map(|p| p.to_string())
    }

    pub fn interface(&self) -> Option<String> {
        self.field(FIELD_INTERFACE)
    }

    pub fn member(&self) -> Option<String> {
        self.field(FIELD_MEMBER)
    }

    /// The body's signature; empty for no body.
    pub fn signature(&self) -> String {
        self.field::<zbus::zvariant::Signature>(FIELD_SIGNATURE)
            .map(|s| s.to_string())
            .unwrap_or_default()
    }

    /// The body as `T`, when its signature is `T`'s.
    pub fn body<T: DeserializeOwned + Type>(&self) -> zbus::Result<T> {
        // A body of several arguments is `T`'s structure without its
        // parentheses.
        let want = T::SIGNATURE.to_string();
        let args = want.strip_prefix('(').and_then(|w| w.strip_suffix(')'));
        let got = self.signature();
        if got != want && Some(got.as_str()) != args {
            return Err(zbus::Error::Failure(format!(
                "a body of type {got:?} where {want:?} was expected"
            )));
        }
        let body = self.data.slice(self.body_at..);
        body.deserialize::<T>().map(|(t, _)| t).map_err(Into::into)
    }

    fn field<T: TryFrom<OwnedValue>>(&self, code: u8) -> Option<T> {
        field(&self.fields, code)
    }
}

/// A header field's value, when present and of type `T`.
fn field<T: TryFrom<OwnedValue>>(fields: &[(u8, OwnedValue)], code: u8) -> Option<T> {
    let (_, v) = fields.iter().find(|(c, _)| *c == code)?;
    v.try_clone().ok().and_then(|v| T::try_from(v).ok())
}

impl Wire {
    fn new(socket: UnixStream) -> Wire {
        Wire {
            socket,
            buf: Vec::new(),
            scratch: vec![0; READ_SIZE],
            fds: VecDeque::new(),
        }
    }

    /// Writes a message built by zbus, with its file descriptors.
    pub fn send(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        let data = msg.data();
        let fds: Vec<BorrowedFd<'_>> = data.fds().iter().map(|fd| fd.as_fd()).collect();
        self.send_bytes(data.bytes(), &fds)
    }

    /// Writes a message as it was received (on another wire).
    pub fn forward(&mut self, msg: &Received) -> zbus::Result<()> {
        let fds: Vec<BorrowedFd<'_>> = msg.data.fds().iter().map(|fd| fd.as_fd()).collect();
        self.send_bytes(msg.data.bytes(), &fds)
    }

    fn send_bytes(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> zbus::Result<()> {
        let mut space =
            vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(protocol("too many file descriptors for one message"));
        }
        // The descriptors go with the first byte; the rest is plain writes.
        let sent = rustix::net::sendmsg(
            &self.socket,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(io)?;
        self.socket.write_all(&bytes[sent..]).map_err(io)
    }

    /// Reads one whole message. The end of the connection is an
    /// `UnexpectedEof` I/O error.
    pub fn receive(&mut self) -> zbus::Result<Received> {
        while self.buf.len() < 16 {
            self.fill()?;
        }
        if self.buf[0] != b'l' {
            return Err(protocol("a message that is not little-endian"));
        }
        let word = |at: usize| {
            u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize
        };
        let (body_len, fields_len) = (word(4), word(12));
        let body_at = (16 + fields_len).div_ceil(8) * 8;
        let total = body_at
            .checked_add(body_len)
            .filter(|&t| t <= MAX_MESSAGE)
            .ok_or_else(|| protocol("a message longer than D-Bus allows"))?;
        while self.buf.len() < total {
            self.fill()?;
        }
        let rest = self.buf.split_off(total);
        let bytes = std::mem::replace(&mut self.buf, rest);
        let fields: Vec<(u8, OwnedValue)> = {
            let head = Data::new(&bytes[..body_at], Context::new_dbus(LE, 0));
            head.slice(12..).deserialize().map_err(protocol)?.0
        };
        let nfds = field::<u32>(&fields, FIELD_UNIX_FDS).unwrap_or(0) as usize;
        if nfds > self.fds.len() {
            return Err(protocol("a message without the file descriptors it names"));
        }
        let fds: Vec<OwnedFd> = self.fds.drain(..nfds).collect();
        Ok(Received {
            data: Data::new_fds(bytes, Context::new_dbus(LE, 0), fds),
            fields,
            body_at,
        })
    }

    /// One `recvmsg`: more bytes, and any file descriptors sent with them.
    fn fill(&mut self) -> zbus::Result<()> {
        // Into a buffer zeroed once: only the bytes received are touched.
        let chunk = &mut self.scratch[..];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.socket,
            &mut [IoSliceMut::new(chunk)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(io)?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                self.fds.extend(fds);
            }
        }
        if got.bytes == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )));
        }
        self.buf.extend_from_slice(&self.scratch[..got.bytes]);
        Ok(())
    }

    /// Takes the server's side of the handshake on `socket` (blocking):
    /// SASL `EXTERNAL` only, for a user `allowed` says yes to (`None`: the
    /// client asked to be known by the socket's credentials), with Unix fd
    /// passing. Gives up on a client that has not finished within
    /// `deadline`.
    pub fn accept(
        mut socket: UnixStream,
        guid: &str,
        deadline: std::time::Duration,
        allowed: impl Fn(Option<u32>) -> bool,
    ) -> zbus::Result<Wire> {
        let until = std::time::Instant::now() + deadline;
        socket.set_nonblocking(false).map_err(io)?;
        let mut nul = [0u8];
        set_deadline(&socket, until)?;
        socket.read_exact(&mut nul).map_err(io)?;
        if nul[0] != 0 {
            return Err(zbus::Error::Handshake("no NUL byte first".into()));
        }
        let mut authed = false;
        let mut waiting_data = false;
        loop {
            set_deadline(&socket, until)?;
            let line = read_line(&mut socket)?;
            let (cmd, arg) = line.split_once(' ').unwrap_or((&line, ""));
            let reply: String = match (cmd, authed) {
                ("AUTH", false) => match arg.split_once(' ').unwrap_or((arg, "")) {
                    ("EXTERNAL", "") => {
                        waiting_data = true;
                        "DATA".into()
                    }
                    ("EXTERNAL", id) => check(id, &allowed, guid),
                    _ => "REJECTED EXTERNAL".into(),
                },
                ("DATA", false) if waiting_data => {
                    waiting_data = false;
                    check(arg, &allowed, guid)
                }
                ("CANCEL" | "ERROR", false) => {
                    waiting_data = false;
                    "REJECTED EXTERNAL".into()
                }
                ("NEGOTIATE_UNIX_FD", true) => "AGREE_UNIX_FD".into(),
                ("BEGIN", true) => break,
                _ => "ERROR \"unexpected command\"".into(),
            };
            authed |= reply.starts_with("OK ");
            socket
                .write_all(format!("{reply}\r\n").as_bytes())
                .map_err(io)?;
        }
        socket.set_read_timeout(None).map_err(io)?;
        Ok(Wire::new(socket))
    }
}

/// The server's answer to an `EXTERNAL` identity (hex of the decimal uid;
/// empty for the socket's credentials).
fn check(hex: &str, allowed: &impl Fn(Option<u32>) -> bool, guid: &str) -> String {
    let uid = if hex.is_empty() {
        Some(None)
    } else {
        decode_hex(hex)
            .and_then(|s| s.parse::<u32>().ok())
            .map(Some)
    };
    match uid {
        Some(uid) if allowed(uid) => format!("OK {guid}"),
        _ => "REJECTED EXTERNAL".into(),
    }
}

fn decode_hex(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn set_deadline(socket: &UnixStream, until: std::time::Instant) -> zbus::Result<()> {
    let left = until.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(zbus::Error::Handshake("no handshake in time".into()));
    }
    socket.set_read_timeout(Some(left)).map_err(io)
}

/// One peer-to-peer connection as a client, used from one thread at a time.
#[derive(Debug)]
pub struct PeerClient {
    wire: Wire,
}

impl PeerClient {
    /// Authenticates on `socket` (a blocking stream) as this process's
    /// user, with Unix fd passing.
    pub fn handshake(mut socket: UnixStream) -> zbus::Result<PeerClient> {
        socket.set_nonblocking(false).map_err(io)?;
        let uid = nix::unistd::geteuid().as_raw().to_string();
        let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        socket
            .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())
            .map_err(io)?;
        let reply = read_line(&mut socket)?;
        if !reply.starts_with("OK ") {
            return Err(zbus::Error::Handshake(format!(
                "the peer refused us: {reply}"
            )));
        }
        socket.write_all(b"NEGOTIATE_UNIX_FD\r\n").map_err(io)?;
        let reply = read_line(&mut socket)?;
        if reply != "AGREE_UNIX_FD" {
            return Err(zbus::Error::Handshake(format!(
                "the peer cannot take file descriptors: {reply}"
            )));
        }
        socket.write_all(b"BEGIN\r\n").map_err(io)?;
        Ok(PeerClient {
            wire: Wire::new(socket),
        })
    }

    /// Calls `member` of `interface` at `path` with `body` and returns the
    /// reply's body. An error reply is a [`zbus::Error::MethodError`] with
    /// the peer's error name and message. Signals that arrive meanwhile are
    /// dropped.
    pub fn call<B, R>(
        &mut self,
        path: &str,
        interface: &str,
        member: &str,
        body: &B,
    ) -> zbus::Result<R>
    where
        B: Serialize + DynamicType,
        R: DeserializeOwned + Type,
    {
        let call = zbus::Message::method_call(path, member)?
            .interface(interface)?
            .build(body)?;
        self.wire.send(&call)?;
        let reply = self.reply_to(call.primary_header().serial_num().get(), |_| Ok(()))?;
        if reply.kind() == ERROR {
            let name: String = reply
                .field(FIELD_ERROR_NAME)
                .ok_or_else(|| protocol("an error reply without a name"))?;
            let text = reply.body::<String>().unwrap_or_default();
            let name = zbus::names::OwnedErrorName::try_from(name).map_err(protocol)?;
            let msg = zbus::Message::error(&call.header(), name.as_ref())?.build(&text)?;
            return Err(zbus::Error::MethodError(name, Some(text), msg));
        }
        reply.body()
    }

    /// Sends a message as it was received elsewhere and returns the reply
    /// to it, handing every other message that arrives first to `other`;
    /// `None` for a call that expects no reply.
    pub fn forward(
        &mut self,
        call: &Received,
        other: impl FnMut(Received) -> zbus::Result<()>,
    ) -> zbus::Result<Option<Received>> {
        self.wire.forward(call)?;
        if !call.expects_reply() {
            return Ok(None);
        }
        self.reply_to(call.serial(), other).map(Some)
    }

    /// Sends a message without waiting for anything back (a call flagged
    /// `NO_REPLY_EXPECTED`, or a signal).
    pub fn send(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        self.wire.send(msg)
    }

    fn reply_to(
        &mut self,
        serial: u32,
        mut other: impl FnMut(Received) -> zbus::Result<()>,
    ) -> zbus::Result<Received> {
        loop {
            let msg = self.wire.receive()?;
            if msg.reply_serial() == Some(serial) && matches!(msg.kind(), METHOD_RETURN | ERROR) {
                return Ok(msg);
            }
            other(msg)?;
        }
    }
}

/// One line of the SASL handshake, without its `\r\n`.
fn read_line(socket: &mut UnixStream) -> zbus::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while !line.ends_with(b"\r\n") {
        if line.len() > MAX_LINE {
            return Err(zbus::Error::Handshake("an endless handshake line".into()));
        }
        socket.read_exact(&mut byte).map_err(io)?;
        line.push(byte[0]);
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line)
        .map_err(|_| zbus::Error::Handshake("a handshake line that is not text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A peer that answers the handshake with `auth`, then writes `then`
    /// once the client's first call has arrived.
    fn fake_peer(auth: &'static str, then: Vec<u8>) -> UnixStream {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut byte = [0u8];
            while !line.ends_with("BEGIN\r\n") {
                if theirs.read_exact(&mut byte).is_err() {
                    return;
                }
                line.push(byte[0] as char);
                if line.ends_with("\r\n") && line.contains("AUTH") {
                    theirs.write_all(auth.as_bytes()).unwrap();
                    line.clear();
                } else if line.ends_with("NEGOTIATE_UNIX_FD\r\n") {
                    theirs.write_all(b"AGREE_UNIX_FD\r\n").unwrap();
                    line.clear();
                }
            }
            // The whole call, so that hanging up resets nothing unread.
            let mut first = [0u8; 16];
            if theirs.read_exact(&mut first).is_ok() {
                let word = |at: usize| u32::from_le_bytes(first[at..at + 4].try_into().unwrap());
                let rest = (16 + word(12) as usize).div_ceil(8) * 8 + word(4) as usize - 16;
                let mut call = vec![0u8; rest];
                theirs.read_exact(&mut call).unwrap();
                let _ = theirs.write_all(&then);
            }
        });
        ours
    }

    fn call(peer: &mut PeerClient) -> zbus::Result<String> {
        peer.call("/t", "org.pocketos.Test", "Echo", &("x",))
    }

    #[test]
    fn a_refused_handshake_is_a_handshake_error() {
        let err = PeerClient::handshake(fake_peer("REJECTED EXTERNAL\r\n", vec![])).unwrap_err();
        assert!(
            matches!(&err, zbus::Error::Handshake(m) if m.contains("REJECTED")),
            "{err}"
        );
    }

    #[test]
    fn a_reply_longer_than_dbus_allows_is_refused_before_it_is_read() {
        let mut head = b"l\x02\x00\x01".to_vec();
        head.extend_from_slice(&(u32::MAX - 64).to_le_bytes());
        head.extend_from_slice(&1u32.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        let mut peer = PeerClient::handshake(fake_peer("OK 0123\r\n", head)).unwrap();
        let err = call(&mut peer).unwrap_err().to_string();
        assert!(err.contains("longer than D-Bus allows"), "{err}");
    }

    #[test]
    fn a_peer_that_hangs_up_mid_message_is_an_error() {
        let mut head = b"l\x02\x00\x01".to_vec();
        head.extend_from_slice(&64u32.to_le_bytes());
        head.extend_from_slice(&1u32.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(b"partial");
        let mut peer = PeerClient::handshake(fake_peer("OK 0123\r\n", head)).unwrap();
        let err = call(&mut peer).unwrap_err().to_string();
        assert!(err.contains("closed the connection"), "{err}");
    }

    #[test]
    fn a_big_endian_reply_is_refused() {
        let head = b"B\x02\x00\x01\0\0\0\0\0\0\0\x01\0\0\0\0".to_vec();
        let mut peer = PeerClient::handshake(fake_peer("OK 0123\r\n", head)).unwrap();
        let err = call(&mut peer).unwrap_err().to_string();
        assert!(err.contains("little-endian"), "{err}");
    }

    struct Echo;

    #[zbus::interface(name = "org.pocketos.Test")]
    impl Echo {
        /// Signals first, then answers: the client must skip the signal.
        async fn echo(
            &self,
            #[zbus(signal_emitter)] emitter: zbus::object_server::SignalEmitter<'_>,
            text: &str,
        ) -> zbus::fdo::Result<String> {
            Echo::noise(&emitter).await?;
            match text {
                "fail" => Err(zbus::fdo::Error::InvalidArgs("no, not that".into())),
                _ => Ok(format!("{text}{text}")),
            }
        }

        /// The file's size, read through the descriptor passed in.
        fn size(&self, file: zbus::zvariant::Fd<'_>) -> u64 {
            let file = std::fs::File::from(file.as_fd().try_clone_to_owned().unwrap());
            file.metadata().unwrap().len()
        }

        #[zbus(signal)]
        async fn noise(emitter: &zbus::object_server::SignalEmitter<'_>) -> zbus::Result<()>;
    }

    #[test]
    fn calls_a_zbus_peer_skipping_its_signals() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                theirs.set_nonblocking(true).unwrap();
                let stream = tokio::net::UnixStream::from_std(theirs).unwrap();
                let conn = zbus::connection::Builder::unix_stream(stream)
                    .server(zbus::Guid::generate())
                    .unwrap()
                    .p2p()
                    .user_id(uid)
                    .serve_at("/t", Echo)
                    .unwrap()
                    .build()
                    .await
                    .unwrap();
                conn.closed().await;
            });
        });
        let mut peer = PeerClient::handshake(ours).unwrap();
        let got: String = peer
            .call("/t", "org.pocketos.Test", "Echo", &("ab",))
            .unwrap();
        assert_eq!(got, "abab");
        match peer.call::<_, String>("/t", "org.pocketos.Test", "Echo", &("fail",)) {
            Err(zbus::Error::MethodError(name, Some(text), _)) => {
                assert_eq!(name.as_str(), "org.freedesktop.DBus.Error.InvalidArgs");
                assert_eq!(text, "no, not that");
            }
            other => panic!("{other:?}"),
        }
        let file = tempfile_of(1234);
        let size: u64 = peer
            .call(
                "/t",
                "org.pocketos.Test",
                "Size",
                &(zbus::zvariant::Fd::from(file.as_fd()),),
            )
            .unwrap();
        assert_eq!(size, 1234);
        let again: String = peer
            .call("/t", "org.pocketos.Test", "Echo", &("c",))
            .unwrap();
        assert_eq!(again, "cc");
    }

    /// The server's side of the handshake, against a given client.
    fn accepting(uid: u32) -> (UnixStream, std::thread::JoinHandle<zbus::Result<Wire>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            Wire::accept(
                theirs,
                "0123456789abcdef0123456789abcdef",
                Duration::from_secs(5),
                |c| c.is_none_or(|c| c == uid),
            )
        });
        (ours, server)
    }

    #[test]
    fn the_server_handshake_takes_zbus_and_our_client_and_refuses_another_user() {
        let me = nix::unistd::geteuid().as_raw();
        // zbus as the client, then a call answered by hand.
        let (socket, server) = accepting(me);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = rt.block_on(async {
            socket.set_nonblocking(true).unwrap();
            let stream = tokio::net::UnixStream::from_std(socket).unwrap();
            zbus::connection::Builder::unix_stream(stream)
                .p2p()
                .build()
                .await
                .unwrap()
        });
        let mut wire = server.join().unwrap().unwrap();
        let answering = std::thread::spawn(move || {
            let call = wire.receive().unwrap();
            assert_eq!(call.kind(), METHOD_CALL);
            assert_eq!(call.member().as_deref(), Some("Echo"));
            assert_eq!(call.path().as_deref(), Some("/t"));
            assert!(call.body::<(u32,)>().is_err(), "a body of another type");
            let (text,): (String,) = call.body().unwrap();
            let serial = std::num::NonZeroU32::new(call.serial()).unwrap();
            let stand_in = zbus::Message::method_call("/t", "Echo")
                .unwrap()
                .serial(serial)
                .build(&())
                .unwrap();
            let reply = zbus::Message::method_return(&stand_in.header())
                .unwrap()
                .build(&(format!("{text}!"),))
                .unwrap();
            wire.send(&reply).unwrap();
        });
        let reply = rt
            .block_on(conn.call_method(
                None::<&str>,
                "/t",
                Some("org.pocketos.Test"),
                "Echo",
                &("hi",),
            ))
            .unwrap();
        assert_eq!(reply.body().deserialize::<String>().unwrap(), "hi!");
        answering.join().unwrap();

        // Our own client.
        let (socket, server) = accepting(me);
        PeerClient::handshake(socket).unwrap();
        server.join().unwrap().unwrap();

        // A client that says it is someone else is refused, and one that
        // says nothing in time is dropped.
        let (socket, server) = accepting(me + 1);
        let err = PeerClient::handshake(socket).unwrap_err();
        assert!(matches!(err, zbus::Error::Handshake(_)), "{err}");
        drop(server);
        let (socket, _silent) = UnixStream::pair().unwrap();
        let started = std::time::Instant::now();
        let err = Wire::accept(socket, "00", Duration::from_millis(200), |_| true).unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?} {err}"
        );
    }

    fn tempfile_of(len: u64) -> std::fs::File {
        let fd = nix::sys::memfd::memfd_create(
            c"peer-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(len).unwrap();
        file
    }
}
