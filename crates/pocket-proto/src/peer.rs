//! A blocking D-Bus client for one peer-to-peer connection, made for the
//! hot path of npud's private channels: the calling thread writes the call
//! and reads the reply itself, with nothing else in between.
//!
//! zbus's connection serves any number of callers: a reader task, a queue
//! of received messages and a wake-up of the caller's future sit between
//! the socket and the reply. On a box that has just swept its caches with
//! a model's weights, each of those steps costs cache misses; on a channel
//! with one caller at a time they buy nothing. This client speaks the same
//! D-Bus wire protocol (SASL `EXTERNAL`, Unix fd passing, zbus's own
//! message encoding), so npud's side of a channel is the same zbus object
//! server either way.

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
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_UNIX_FDS: u8 = 9;
/// Message types.
const METHOD_RETURN: u8 = 2;
const ERROR: u8 = 3;
/// The largest message D-Bus allows.
const MAX_MESSAGE: usize = 128 << 20;
/// File descriptors one `recvmsg` takes at most.
const MAX_FDS: usize = 16;

/// One peer-to-peer D-Bus connection, used from one thread at a time.
#[derive(Debug)]
pub struct PeerClient {
    socket: UnixStream,
    /// Bytes read past the last whole message.
    buf: Vec<u8>,
    /// File descriptors received and not yet claimed by a message.
    fds: VecDeque<OwnedFd>,
}

fn io(e: impl Into<std::io::Error>) -> zbus::Error {
    zbus::Error::InputOutput(std::sync::Arc::new(e.into()))
}

fn protocol(what: impl std::fmt::Display) -> zbus::Error {
    zbus::Error::Failure(format!("the peer broke the D-Bus protocol: {what}"))
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
            socket,
            buf: Vec::new(),
            fds: VecDeque::new(),
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
        let serial = call.primary_header().serial_num().get();
        self.send(&call)?;
        loop {
            let Received { kind, fields, body } = self.receive()?;
            let reply_to = field::<u32>(&fields, FIELD_REPLY_SERIAL);
            if reply_to != Some(serial) || !matches!(kind, METHOD_RETURN | ERROR) {
                continue;
            }
            if kind == ERROR {
                let name: String = field(&fields, FIELD_ERROR_NAME)
                    .ok_or_else(|| protocol("an error reply without a name"))?;
                let text = body
                    .deserialize::<String>()
                    .map(|(t, _)| t)
                    .unwrap_or_default();
                let name = zbus::names::OwnedErrorName::try_from(name).map_err(protocol)?;
                let msg = zbus::Message::error(&call.header(), name.as_ref())?.build(&text)?;
                return Err(zbus::Error::MethodError(name, Some(text), msg));
            }
            return body.deserialize::<R>().map(|(r, _)| r).map_err(Into::into);
        }
    }

    fn send(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        let data = msg.data();
        let fds: Vec<BorrowedFd<'_>> = data.fds().iter().map(|fd| fd.as_fd()).collect();
        let mut bytes: &[u8] = data.bytes();
        let mut space =
            vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
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
        bytes = &bytes[sent..];
        self.socket.write_all(bytes).map_err(io)
    }

    /// Reads one whole message.
    fn receive(&mut self) -> zbus::Result<Received> {
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
        let kind = bytes[1];
        let fields: Vec<(u8, OwnedValue)> = {
            let head = Data::new(&bytes[..body_at], Context::new_dbus(LE, 0));
            head.slice(12..).deserialize().map_err(protocol)?.0
        };
        let nfds = field::<u32>(&fields, FIELD_UNIX_FDS).unwrap_or(0) as usize;
        if nfds > self.fds.len() {
            return Err(protocol("a message without the file descriptors it names"));
        }
        let fds: Vec<OwnedFd> = self.fds.drain(..nfds).collect();
        let body = Data::new_fds(bytes, Context::new_dbus(LE, 0), fds).slice(body_at..);
        Ok(Received { kind, fields, body })
    }

    /// One `recvmsg`: more bytes, and any file descriptors sent with them.
    fn fill(&mut self) -> zbus::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.socket,
            &mut [IoSliceMut::new(&mut chunk)],
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
        self.buf.extend_from_slice(&chunk[..got.bytes]);
        Ok(())
    }
}

/// One message as read: its type, header fields, and body (which owns
/// the file descriptors that came with it).
struct Received {
    kind: u8,
    fields: Vec<(u8, OwnedValue)>,
    body: Data<'static, 'static>,
}

/// A header field's value, when present and of type `T`.
fn field<T: TryFrom<OwnedValue>>(fields: &[(u8, OwnedValue)], code: u8) -> Option<T> {
    let (_, v) = fields.iter().find(|(c, _)| *c == code)?;
    v.try_clone().ok().and_then(|v| T::try_from(v).ok())
}

/// One line of the SASL handshake, without its `\r\n`.
fn read_line(socket: &mut UnixStream) -> zbus::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while !line.ends_with(b"\r\n") {
        if line.len() > 4096 {
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
