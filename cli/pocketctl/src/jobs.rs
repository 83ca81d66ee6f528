//! Waiting for a daemon's job (a model install, a system update): progress
//! bar from its properties, the end from its phase or its completion signal,
//! Ctrl-C cancels it.

use crate::progress_bar;
use anyhow::{anyhow, bail, Result};
use futures_util::{Stream, StreamExt};
use std::time::Duration;

/// What a waiting client reads from a job object.
pub(crate) trait JobView {
    async fn phase(&self) -> zbus::Result<String>;
    async fn progress(&self) -> zbus::Result<(u64, u64)>;
    async fn error(&self) -> zbus::Result<(String, String)>;
    async fn cancel(&self) -> zbus::Result<()>;
}

/// A completion signal: (job path, success, error name, error message).
pub(crate) type Finished = (String, bool, String, String);

/// Waits for the job at `path` to finish; `Err` carries the daemon's
/// error as one line. `daemon` names who left when the bus goes away.
pub(crate) async fn wait(
    job: &impl JobView,
    path: &str,
    mut finished: impl Stream<Item = Finished> + Unpin,
    is_terminal: fn(&str) -> bool,
    daemon: &str,
    json: bool,
) -> Result<()> {
    let bar = progress_bar(json);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let result: Result<(), (String, String)> = loop {
        let ph = job.phase().await?;
        if is_terminal(&ph) {
            break if ph == "done" {
                Ok(())
            } else {
                Err(job.error().await?)
            };
        }
        if let Some(bar) = &bar {
            let (done, total) = job.progress().await?;
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(ph);
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

impl JobView for pocket_proto::models::JobProxy<'_> {
    async fn phase(&self) -> zbus::Result<String> {
        pocket_proto::models::JobProxy::phase(self).await
    }
    async fn progress(&self) -> zbus::Result<(u64, u64)> {
        Ok((self.bytes_done().await?, self.bytes_total().await?))
    }
    async fn error(&self) -> zbus::Result<(String, String)> {
        Ok((self.error_name().await?, self.error_message().await?))
    }
    async fn cancel(&self) -> zbus::Result<()> {
        pocket_proto::models::JobProxy::cancel(self).await
    }
}

impl JobView for pocket_proto::update::UpdateJobProxy<'_> {
    async fn phase(&self) -> zbus::Result<String> {
        pocket_proto::update::UpdateJobProxy::phase(self).await
    }
    async fn progress(&self) -> zbus::Result<(u64, u64)> {
        Ok((self.bytes_done().await?, self.bytes_total().await?))
    }
    async fn error(&self) -> zbus::Result<(String, String)> {
        Ok((self.error_name().await?, self.error_message().await?))
    }
    async fn cancel(&self) -> zbus::Result<()> {
        pocket_proto::update::UpdateJobProxy::cancel(self).await
    }
}
