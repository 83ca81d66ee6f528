//! Waiting for a daemon's job (a model install, a system update): progress
//! bar from its properties, the end from its phase or its completion signal,
//! Ctrl-C cancels it.

use crate::progress_bar;
use anyhow::{anyhow, bail, Result};
use futures_util::{Stream, StreamExt};
use pocket_proto::job::{Job1Proxy, Phase};
use std::time::Duration;

/// A completion signal: (job path, success, error name, error message).
pub(crate) type Finished = (String, bool, String, String);

/// Waits for the job at `path` to finish; `Err` carries the daemon's
/// error as one line. `daemon` names who left when the bus goes away.
pub(crate) async fn wait(
    job: &Job1Proxy<'_>,
    path: &str,
    mut finished: impl Stream<Item = Finished> + Unpin,
    daemon: &str,
    json: bool,
) -> Result<()> {
    let bar = progress_bar(json);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let result: Result<(), (String, String)> = loop {
        let ph = job.current_phase().await?;
        if ph.is_terminal() {
            break if ph == Phase::Done {
                Ok(())
            } else {
                Err((job.error_name().await?, job.error_message().await?))
            };
        }
        if let Some(bar) = &bar {
            bar.set_length(job.bytes_total().await?);
            bar.set_position(job.bytes_done().await?);
            bar.set_message(ph.as_str());
        }
        tokio::select! {
            sig = finished.next() => {
                let Some((p, ok, name, msg)) = sig else { bail!("{daemon} left the bus during the job") };
                if p == path {
                    break if ok { Ok(()) } else { Err((name, msg)) };
                }
            }
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                let _ = job.cancel().await;
            }
        }
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    result.map_err(|(name, msg)| anyhow!("{msg} ({})", pocket_proto::short_error_name(&name)))
}
