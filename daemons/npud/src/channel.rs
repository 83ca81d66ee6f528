//! The server side of a private channel (`OpenChannel`), on a thread of its
//! own: that thread reads each call, answers `Infer` and `InferFd` itself
//! (running the model on this thread) and writes the reply, so the kernel
//! wakes one thread once per call. Every other call (loads, properties,
//! introspection) goes to a zbus object server for the same object on
//! npud's runtime, and its answer comes back the same way.
//!
//! Serving the hot calls through zbus's object server cost a reader task, a
//! message queue and a dispatch per call, all with cold caches right after
//! the model had swept them (`docs/runtime.md`).

use crate::interface::{Error, RuntimeIface};
use pocket_proto::peer::{PeerClient, Received, Wire, METHOD_CALL};
use pocket_proto::runtime::{Tensor, TensorRef, INTERFACE, PATH};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use zbus::DBusError;

/// How long a client has to finish D-Bus's handshake on a new channel.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `iface` (a channel's object, for user `uid`) on `socket` until
/// the client closes it. Blocks: run it on the channel's own thread.
pub fn serve(
    iface: RuntimeIface,
    handle: tokio::runtime::Handle,
    socket: UnixStream,
    uid: u32,
) -> zbus::Result<()> {
    // The socket's own credentials are npud's: the client is checked
    // against the caller of OpenChannel instead.
    let guid = zbus::Guid::generate();
    let mut wire = Wire::accept(socket, guid.as_str(), HANDSHAKE, |claimed| {
        claimed.is_none_or(|c| c == uid)
    })?;
    let mut others: Option<PeerClient> = None;
    loop {
        let call = match wire.receive() {
            Ok(call) => call,
            Err(zbus::Error::InputOutput(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if call.kind() != METHOD_CALL {
            continue;
        }
        let ours = call.path() == Some(PATH) && call.interface().is_none_or(|i| i == INTERFACE);
        match call.member() {
            Some(member @ ("Infer" | "InferFd")) if ours => {
                answer(&mut wire, &iface, &handle, &call, member)?;
                continue;
            }
            _ => {}
        }
        if others.is_none() {
            others = Some(object_server(&iface, &handle)?);
        }
        let server = others.as_mut().expect("just set");
        if let Some(reply) = server.forward(&call, |signal| wire.forward(&signal))? {
            wire.forward(&reply)?;
        }
    }
}

/// Runs an `Infer` or `InferFd` call and writes its reply.
fn answer(
    wire: &mut Wire,
    iface: &RuntimeIface,
    handle: &tokio::runtime::Handle,
    call: &Received,
    member: &str,
) -> zbus::Result<()> {
    let bad_args = |wire: &mut Wire, e: zbus::Error| {
        let name = "org.freedesktop.DBus.Error.InvalidArgs";
        wire.reply_error(call, name, &format!("{member}: {e}"))
    };
    if member == "Infer" {
        match call.body::<(String, HashMap<String, Tensor>)>() {
            Ok((name, inputs)) => {
                let result = handle.block_on(iface.infer(&name, inputs));
                reply(wire, call, member, result)
            }
            Err(e) => bad_args(wire, e),
        }
    } else {
        match call.body::<(String, HashMap<String, TensorRef>, zbus::zvariant::OwnedFd)>() {
            Ok((name, inputs, data)) => {
                let result = handle.block_on(iface.infer_fd(&name, inputs, data));
                reply(wire, call, member, result)
            }
            Err(e) => bad_args(wire, e),
        }
    }
}

/// Writes `result` in reply to `call` (of `member`): its value, or the
/// error as npud's object server would send it.
fn reply<T>(
    wire: &mut Wire,
    call: &Received,
    member: &str,
    result: Result<T, Error>,
) -> zbus::Result<()>
where
    T: serde::Serialize + zbus::zvariant::Type,
{
    let e = match result {
        Ok(body) => return wire.reply(call, &body),
        Err(e) => e,
    };
    if !call.expects_reply() {
        return Ok(());
    }
    // zbus builds the error from the call's header; a call of ours with
    // the same serial stands in for the one received.
    let serial = std::num::NonZeroU32::new(call.serial())
        .ok_or_else(|| zbus::Error::Failure("a call with serial 0".into()))?;
    let stand_in = zbus::Message::method_call(PATH, member)?
        .serial(serial)
        .build(&())?;
    wire.send(&e.create_reply(&stand_in.header())?)
}

/// A zbus object server for the channel's object on npud's runtime, over
/// a socket pair of its own, for the calls the channel's thread does not
/// answer itself.
fn object_server(
    iface: &RuntimeIface,
    handle: &tokio::runtime::Handle,
) -> zbus::Result<PeerClient> {
    let (server, client) = UnixStream::pair()?;
    server.set_nonblocking(true)?;
    let iface = iface.shared();
    // Only this thread holds the other end: it authenticates as npud.
    let euid = nix::unistd::geteuid().as_raw();
    handle.spawn(async move {
        let serve = async {
            let stream = tokio::net::UnixStream::from_std(server)?;
            let conn = zbus::connection::Builder::unix_stream(stream)
                .server(zbus::Guid::generate())?
                .p2p()
                .user_id(euid)
                .serve_at(PATH, iface)?
                .build()
                .await?;
            conn.closed().await;
            zbus::Result::Ok(())
        };
        if let Err(e) = serve.await {
            tracing::debug!("a channel's object server: {e}");
        }
    });
    PeerClient::handshake(client)
}
