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
//! D-Bus wire protocol (SASL `EXTERNAL`, Unix fd passing), so either end may
//! be zbus.
//!
//! Bodies are encoded and decoded by zvariant, as zbus does. Headers are
//! read and written here: zbus's message builder and header parser measured
//! 25-40 µs each per message with cold caches (a stand-in call to reply to,
//! the reply, the header fields), against about 5 µs for the plain walk over
//! the few fields a call and its reply carry (`docs/runtime.md`).

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
use zbus::zvariant::{Type, LE};

/// Header field codes (D-Bus specification, "Message Format").
const FIELD_PATH: u8 = 1;
const FIELD_INTERFACE: u8 = 2;
const FIELD_MEMBER: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_DESTINATION: u8 = 6;
const FIELD_SENDER: u8 = 7;
const FIELD_SIGNATURE: u8 = 8;
const FIELD_UNIX_FDS: u8 = 9;
/// Message types.
pub const METHOD_CALL: u8 = 1;
pub const METHOD_RETURN: u8 = 2;
pub const ERROR: u8 = 3;
/// The header flag of a call whose sender waits for no reply.
const NO_REPLY_EXPECTED: u8 = 0x1;
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
    /// The serial of the last message this end wrote.
    serial: u32,
}

/// One message as read: the whole of it, with the file descriptors that
/// came with it, and where its header fields lie in it.
pub struct Received {
    data: Data<'static, 'static>,
    fields: Fields,
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
        self.data[2] & NO_REPLY_EXPECTED == 0
    }

    pub fn serial(&self) -> u32 {
        u32::from_le_bytes(self.data[8..12].try_into().expect("4 bytes"))
    }

    pub fn reply_serial(&self) -> Option<u32> {
        self.fields.reply_serial
    }

    pub fn path(&self) -> Option<&str> {
        self.text(FIELD_PATH)
    }

    pub fn interface(&self) -> Option<&str> {
        self.text(FIELD_INTERFACE)
    }

    pub fn member(&self) -> Option<&str> {
        self.text(FIELD_MEMBER)
    }

    pub fn error_name(&self) -> Option<&str> {
        self.text(FIELD_ERROR_NAME)
    }

    /// The body's signature; empty for no body.
    pub fn signature(&self) -> &str {
        self.text(FIELD_SIGNATURE).unwrap_or_default()
    }

    /// The body as `T`, when its signature is `T`'s.
    pub fn body<T: DeserializeOwned + Type>(&self) -> zbus::Result<T> {
        let got = self.signature();
        if !body_signature(T::SIGNATURE, |want| want == got) {
            return Err(zbus::Error::Failure(format!(
                "a body of type {got:?} where {} was expected",
                T::SIGNATURE
            )));
        }
        let body = self.data.slice(self.body_at..);
        body.deserialize::<T>().map(|(t, _)| t).map_err(Into::into)
    }

    /// A string field's value (an object path, a name or a signature).
    fn text(&self, code: u8) -> Option<&str> {
        let (start, end) = self.fields.text[usize::from(code - 1)]?;
        std::str::from_utf8(&self.data[start..end]).ok()
    }
}

/// Hands `f` the header signature of a body of type `signature`: a body of
/// several arguments is their structure without its parentheses, and no
/// body (`()`) has none.
fn body_signature<T>(signature: &zbus::zvariant::Signature, f: impl FnOnce(&str) -> T) -> T {
    use zbus::zvariant::Signature;
    match signature {
        Signature::Unit => f(""),
        Signature::Structure(_) => f(&signature.to_string_no_parens()),
        _ => f(&signature.to_string()),
    }
}

/// The standard header fields of a message that say where it goes and
/// what it holds: strings as where they lie in its bytes.
#[derive(Debug, Default)]
struct Fields {
    /// By field code less one: the path, interface, member, error name,
    /// destination, sender and signature (codes 1 to 4 and 6 to 8).
    text: [Option<(usize, usize)>; 9],
    reply_serial: Option<u32>,
    unix_fds: Option<u32>,
}

impl Fields {
    /// Reads the header fields of a little-endian message whose fields
    /// array ends at `end`: the ones above by hand, any other through
    /// zvariant. Nothing is copied.
    fn read(bytes: &[u8], end: usize) -> Result<Fields, String> {
        let truncated = || "a header field runs past the header".to_string();
        let word = |at: usize| -> Result<u32, String> {
            let b = bytes.get(at..at + 4).ok_or_else(truncated)?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        // A string of `len` bytes at `at`, with its NUL.
        let string = |at: usize, len: usize| -> Result<(usize, usize), String> {
            let stop = at.checked_add(len).ok_or_else(truncated)?;
            match bytes.get(at..=stop) {
                Some([text @ .., 0]) if std::str::from_utf8(text).is_ok() => Ok((at, stop)),
                Some(_) => Err("a header string that is not UTF-8 ending in NUL".into()),
                None => Err(truncated()),
            }
        };
        let mut fields = Fields::default();
        let mut at = 16;
        while at < end {
            at = at.next_multiple_of(8);
            let (code, sig_len) = match bytes.get(at..at + 2) {
                Some(&[code, len]) => (code, usize::from(len)),
                _ => return Err(truncated()),
            };
            let sig = string(at + 2, sig_len)?;
            let value = sig.1 + 1;
            let sig = &bytes[sig.0..sig.1];
            at = match (code, sig) {
                (FIELD_PATH, b"o")
                | (
                    FIELD_INTERFACE | FIELD_MEMBER | FIELD_ERROR_NAME | FIELD_DESTINATION
                    | FIELD_SENDER,
                    b"s",
                ) => {
                    let value = value.next_multiple_of(4);
                    let text = string(value + 4, word(value)? as usize)?;
                    fields.text[usize::from(code - 1)] = Some(text);
                    text.1 + 1
                }
                (FIELD_SIGNATURE, b"g") => {
                    let len = *bytes.get(value).ok_or_else(truncated)?;
                    let text = string(value + 1, usize::from(len))?;
                    fields.text[usize::from(code - 1)] = Some(text);
                    text.1 + 1
                }
                (FIELD_REPLY_SERIAL | FIELD_UNIX_FDS, b"u") => {
                    let value = value.next_multiple_of(4);
                    let n = Some(word(value)?);
                    if code == FIELD_REPLY_SERIAL {
                        fields.reply_serial = n;
                    } else {
                        fields.unix_fds = n;
                    }
                    value + 4
                }
                (1..=9, _) => {
                    return Err(format!(
                        "header field {code} of type {:?}",
                        String::from_utf8_lossy(sig)
                    ))
                }
                // A field this version of D-Bus does not know: skipped.
                _ => {
                    let all = bytes
                        .get(..end)
                        .filter(|b| b.len() > at)
                        .ok_or_else(truncated)?;
                    let (_, len) = Data::new(all, Context::new_dbus(LE, 0))
                        .slice(at + 1..)
                        .deserialize::<zbus::zvariant::Value<'_>>()
                        .map_err(|e| e.to_string())?;
                    at + 1 + len
                }
            };
        }
        if at > end {
            return Err(truncated());
        }
        Ok(fields)
    }
}

/// The header fields of a reply to `call`: its serial, and its sender
/// as the destination (on a bus).
fn reply_fields(call: &Received) -> [(u8, Option<Field<'_>>); 2] {
    [
        (FIELD_REPLY_SERIAL, Some(Field::Number(call.serial()))),
        (
            FIELD_DESTINATION,
            call.text(FIELD_SENDER).map(|s| Field::Text(b's', s)),
        ),
    ]
}

/// A header field's value, to write.
enum Field<'a> {
    /// A string of D-Bus type `s`, `o` or `g`.
    Text(u8, &'a str),
    Number(u32),
}

/// Writes a message's header, padded to where its body starts: each field
/// of `fields` that is `Some`, in order.
fn write_header(
    kind: u8,
    serial: u32,
    body_len: usize,
    fields: &[(u8, Option<Field<'_>>)],
) -> zbus::Result<Vec<u8>> {
    let body_len = u32::try_from(body_len).map_err(|_| zbus::Error::ExcessData)?;
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(&[b'l', kind, 0, 1]);
    h.extend_from_slice(&body_len.to_le_bytes());
    h.extend_from_slice(&serial.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    let pad = |h: &mut Vec<u8>, to: usize| h.resize(h.len().next_multiple_of(to), 0);
    for (code, value) in fields {
        let Some(value) = value else { continue };
        pad(&mut h, 8);
        h.push(*code);
        match value {
            Field::Text(b'g', text) => {
                let len = u8::try_from(text.len()).map_err(|_| zbus::Error::ExcessData)?;
                h.extend_from_slice(&[1, b'g', 0, len]);
                h.extend_from_slice(text.as_bytes());
            }
            Field::Text(kind, text) => {
                h.extend_from_slice(&[1, *kind, 0]);
                pad(&mut h, 4);
                let len = u32::try_from(text.len()).map_err(|_| zbus::Error::ExcessData)?;
                h.extend_from_slice(&len.to_le_bytes());
                h.extend_from_slice(text.as_bytes());
            }
            Field::Number(n) => {
                h.extend_from_slice(&[1, b'u', 0]);
                pad(&mut h, 4);
                h.extend_from_slice(&n.to_le_bytes());
                continue;
            }
        }
        h.push(0);
    }
    let fields_len = (h.len() - 16) as u32;
    h[12..16].copy_from_slice(&fields_len.to_le_bytes());
    pad(&mut h, 8);
    if h.len() + body_len as usize > MAX_MESSAGE {
        return Err(zbus::Error::ExcessData);
    }
    Ok(h)
}

impl Wire {
    fn new(socket: UnixStream) -> Wire {
        Wire {
            socket,
            buf: Vec::new(),
            scratch: vec![0; READ_SIZE],
            fds: VecDeque::new(),
            serial: 0,
        }
    }

    /// Writes a message built by zbus, with its file descriptors.
    pub fn send(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        let data = msg.data();
        let fds: Vec<BorrowedFd<'_>> = data.fds().iter().map(|fd| fd.as_fd()).collect();
        self.send_bytes(&[data.bytes()], &fds)
    }

    /// Writes a message as it was received (on another wire).
    pub fn forward(&mut self, msg: &Received) -> zbus::Result<()> {
        let fds: Vec<BorrowedFd<'_>> = msg.data.fds().iter().map(|fd| fd.as_fd()).collect();
        self.send_bytes(&[msg.data.bytes()], &fds)
    }

    /// Writes a call of `member` of `interface` at `path`; its serial.
    pub fn call<B: Serialize + Type>(
        &mut self,
        path: &str,
        interface: &str,
        member: &str,
        body: &B,
    ) -> zbus::Result<u32> {
        zbus::zvariant::ObjectPath::try_from(path)?;
        zbus::names::InterfaceName::try_from(interface)?;
        zbus::names::MemberName::try_from(member)?;
        let fields = [
            (FIELD_PATH, Some(Field::Text(b'o', path))),
            (FIELD_INTERFACE, Some(Field::Text(b's', interface))),
            (FIELD_MEMBER, Some(Field::Text(b's', member))),
        ];
        self.write(METHOD_CALL, fields, body)
    }

    /// Writes the reply to `call`, when its sender waits for one.
    pub fn reply<B: Serialize + Type>(&mut self, call: &Received, body: &B) -> zbus::Result<()> {
        if call.expects_reply() {
            self.write(METHOD_RETURN, reply_fields(call), body)?;
        }
        Ok(())
    }

    /// Writes the error `name` with `text` in reply to `call`, when its
    /// sender waits for a reply.
    pub fn reply_error(&mut self, call: &Received, name: &str, text: &str) -> zbus::Result<()> {
        if call.expects_reply() {
            zbus::names::ErrorName::try_from(name)?;
            let [serial, destination] = reply_fields(call);
            let fields = [
                serial,
                destination,
                (FIELD_ERROR_NAME, Some(Field::Text(b's', name))),
            ];
            self.write(ERROR, fields, &(text,))?;
        }
        Ok(())
    }

    /// Writes a message of `kind` with `fields` and `body` (encoded by
    /// zvariant, as zbus would); its serial.
    fn write<B: Serialize + Type, const N: usize>(
        &mut self,
        kind: u8,
        fields: [(u8, Option<Field<'_>>); N],
        body: &B,
    ) -> zbus::Result<u32> {
        let body = zbus::zvariant::to_bytes(Context::new_dbus(LE, 0), body)?;
        let fds: Vec<BorrowedFd<'_>> = body.fds().iter().map(|fd| fd.as_fd()).collect();
        let nfds = u32::try_from(fds.len()).map_err(|_| zbus::Error::ExcessData)?;
        self.serial = self.serial.checked_add(1).unwrap_or(1);
        let header = body_signature(B::SIGNATURE, |sig| {
            let mut all = Vec::with_capacity(N + 2);
            all.extend(fields);
            all.push((
                FIELD_SIGNATURE,
                (!sig.is_empty()).then_some(Field::Text(b'g', sig)),
            ));
            all.push((FIELD_UNIX_FDS, (nfds > 0).then_some(Field::Number(nfds))));
            write_header(kind, self.serial, body.len(), &all)
        })?;
        self.send_bytes(&[&header, body.bytes()], &fds)?;
        Ok(self.serial)
    }

    /// Writes `parts`, one after the other, with `fds` on the first byte.
    fn send_bytes(&mut self, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> zbus::Result<()> {
        let mut space =
            vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(protocol("too many file descriptors for one message"));
        }
        // The descriptors go with the first byte; the rest is plain writes.
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut sent =
            rustix::net::sendmsg(&self.socket, &slices, &mut control, SendFlags::NOSIGNAL)
                .map_err(io)?;
        for part in parts {
            let done = sent.min(part.len());
            sent -= done;
            self.socket.write_all(&part[done..]).map_err(io)?;
        }
        Ok(())
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
        let fields = Fields::read(&bytes, 16 + fields_len).map_err(protocol)?;
        let nfds = fields.unix_fds.unwrap_or(0) as usize;
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
        B: Serialize + Type,
        R: DeserializeOwned + Type,
    {
        let serial = self.wire.call(path, interface, member, body)?;
        let reply = self.reply_to(serial, |_| Ok(()))?;
        if reply.kind() == ERROR {
            let name = reply
                .error_name()
                .ok_or_else(|| protocol("an error reply without a name"))?;
            let name = zbus::names::OwnedErrorName::try_from(name).map_err(protocol)?;
            let text = reply.body::<String>().unwrap_or_default();
            // zbus's error carries the error as a message too: one in
            // reply to a call like ours.
            let call = zbus::Message::method_call(path, member)?
                .interface(interface)?
                .build(&())?;
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
        // Names D-Bus would refuse are refused before anything is sent.
        for (iface, member) in [("org.pocketos.Test", "Not a member"), ("no-dots", "Echo")] {
            let err = peer
                .call::<_, String>("/t", iface, member, &("ab",))
                .unwrap_err();
            assert!(matches!(err, zbus::Error::Names(_)), "{err}");
        }
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

    /// A zbus client connected to our server's side of the handshake
    /// (for user `uid`), on a runtime of its own.
    fn zbus_client_of_our_server(uid: u32) -> (tokio::runtime::Runtime, zbus::Connection, Wire) {
        let (socket, server) = accepting(uid);
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
        let wire = server.join().unwrap().unwrap();
        (rt, conn, wire)
    }

    #[test]
    fn the_server_handshake_takes_zbus_and_our_client_and_refuses_another_user() {
        let me = nix::unistd::geteuid().as_raw();
        // zbus as the client, then a call answered by hand.
        let (rt, conn, mut wire) = zbus_client_of_our_server(me);
        let answering = std::thread::spawn(move || {
            let call = wire.receive().unwrap();
            assert_eq!(call.kind(), METHOD_CALL);
            assert_eq!(call.member(), Some("Echo"));
            assert_eq!(call.path(), Some("/t"));
            assert!(call.body::<(u32,)>().is_err(), "a body of another type");
            let (text,): (String,) = call.body().unwrap();
            wire.reply(&call, &(format!("{text}!"),)).unwrap();
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

    #[test]
    fn zbus_reads_the_messages_we_write_and_we_read_its_own() {
        let me = nix::unistd::geteuid().as_raw();
        let (rt, conn, mut wire) = zbus_client_of_our_server(me);
        let answering = std::thread::spawn(move || {
            // A call with every field zbus sets, and a file descriptor.
            let call = wire.receive().unwrap();
            assert_eq!(call.path(), Some("/t/deep"));
            assert_eq!(call.interface(), Some("org.pocketos.Test"));
            assert_eq!(call.member(), Some("Grow"));
            assert_eq!(call.signature(), "hs");
            assert!(call.expects_reply());
            let (file, text): (zbus::zvariant::OwnedFd, String) = call.body().unwrap();
            let file = std::fs::File::from(std::os::fd::OwnedFd::from(file));
            file.set_len(4321).unwrap();
            // The reply carries the descriptor back, and a structure.
            let back = zbus::zvariant::Fd::from(file.as_fd());
            let body = (back, (text.len() as u32, vec![1i64, -2]), "done");
            wire.reply(&call, &body).unwrap();
            // An error reply, and nothing for a call that wants none.
            let call = wire.receive().unwrap();
            assert_eq!(call.member(), Some("Fail"));
            wire.reply_error(&call, "org.pocketos.Error.Nope", "not today")
                .unwrap();
            let quiet = wire.receive().unwrap();
            assert!(!quiet.expects_reply());
            wire.reply(&quiet, &("unheard",)).unwrap();
            let call = wire.receive().unwrap();
            assert_eq!(call.signature(), "");
            wire.reply(&call, &()).unwrap();
        });
        let file = tempfile_of(10);
        let reply = rt
            .block_on(conn.call_method(
                Some("org.pocketos.Peer"),
                "/t/deep",
                Some("org.pocketos.Test"),
                "Grow",
                &(zbus::zvariant::Fd::from(file.as_fd()), "four"),
            ))
            .unwrap();
        let header = reply.header();
        assert_eq!(header.message_type(), zbus::message::Type::MethodReturn);
        assert_eq!(header.signature().to_string_no_parens(), "h(uax)s");
        let (back, inner, done): (zbus::zvariant::OwnedFd, (u32, Vec<i64>), String) =
            reply.body().deserialize().unwrap();
        let back = std::fs::File::from(std::os::fd::OwnedFd::from(back));
        assert_eq!(back.metadata().unwrap().len(), 4321);
        assert_eq!((inner, done.as_str()), ((4, vec![1, -2]), "done"));
        match rt.block_on(conn.call_method(None::<&str>, "/t", None::<&str>, "Fail", &())) {
            Err(zbus::Error::MethodError(name, Some(text), _)) => {
                assert_eq!(name.as_str(), "org.pocketos.Error.Nope");
                assert_eq!(text, "not today");
            }
            other => panic!("{other:?}"),
        }
        let quiet = zbus::Message::method_call("/t", "Quiet")
            .unwrap()
            .with_flags(zbus::message::Flags::NoReplyExpected)
            .unwrap()
            .build(&())
            .unwrap();
        rt.block_on(conn.send(&quiet)).unwrap();
        // Had the quiet call been answered, this would get its reply.
        let reply = rt
            .block_on(conn.call_method(None::<&str>, "/t", None::<&str>, "Empty", &()))
            .unwrap();
        assert_eq!(reply.header().signature().to_string(), "");
        answering.join().unwrap();
    }

    #[test]
    fn a_bad_header_is_an_error_and_an_unknown_field_is_skipped() {
        let fields = |list: &[(u8, Option<Field<'_>>)]| {
            let h = write_header(METHOD_CALL, 7, 0, list).unwrap();
            let end = 16 + u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
            (h, end)
        };
        let (h, end) = fields(&[
            (FIELD_PATH, Some(Field::Text(b'o', "/a"))),
            (42, Some(Field::Text(b's', "from a later D-Bus"))),
            (FIELD_MEMBER, Some(Field::Text(b's', "M"))),
            (43, Some(Field::Number(9))),
            (FIELD_SIGNATURE, Some(Field::Text(b'g', "a{sv}"))),
            (FIELD_REPLY_SERIAL, Some(Field::Number(5))),
        ]);
        let read = Fields::read(&h, end).unwrap();
        let text = |code: u8| read.text[usize::from(code - 1)].map(|(a, b)| &h[a..b]);
        assert_eq!(text(FIELD_PATH), Some(&b"/a"[..]));
        assert_eq!(text(FIELD_MEMBER), Some(&b"M"[..]));
        assert_eq!(text(FIELD_SIGNATURE), Some(&b"a{sv}"[..]));
        assert_eq!(text(FIELD_INTERFACE), None);
        assert_eq!(read.reply_serial, Some(5));
        // Cut anywhere, the header is an error, never a panic.
        for cut in 17..end {
            assert!(Fields::read(&h[..cut], end).is_err(), "cut at {cut}");
        }
        // A standard field of the wrong type.
        let (h, end) = fields(&[(FIELD_MEMBER, Some(Field::Number(3)))]);
        let err = Fields::read(&h, end).unwrap_err();
        assert!(err.contains("header field 3"), "{err}");
        // A string that is not UTF-8.
        let (mut h, end) = fields(&[(FIELD_MEMBER, Some(Field::Text(b's', "ab")))]);
        h[24] = 0xff;
        assert!(Fields::read(&h, end).is_err());
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
