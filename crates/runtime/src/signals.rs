//! Passing the signals the caller receives on to its container, as `podman
//! run` does: a service manager stops `lazylayer run` with SIGTERM, a closed
//! terminal sends SIGHUP, Ctrl-C SIGINT, and each must reach the container.

use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{RunningContainer, RuntimeError};

/// SIGTERM, SIGHUP and SIGINT, as one stream of signal numbers. Installed
/// before anything is started, so none of them kills the caller outright.
pub struct ForwardedSignals {
    term: Signal,
    hup: Signal,
    int: Signal,
}

impl ForwardedSignals {
    pub fn install() -> std::io::Result<ForwardedSignals> {
        Ok(ForwardedSignals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => SignalKind::terminate().as_raw_value(),
            _ = self.hup.recv() => SignalKind::hangup().as_raw_value(),
            _ = self.int.recv() => SignalKind::interrupt().as_raw_value(),
        }
    }
}

/// `SIGTERM`, `SIGHUP`, `SIGINT`, else `signal N`.
pub fn signal_name(sig: i32) -> String {
    match sig {
        1 => "SIGHUP".into(),
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

impl RunningContainer {
    /// Waits for the container's exit; meanwhile every signal `signals`
    /// receives goes to the container's init, and a container still running
    /// `grace` after the first one is KILLed. Returns its exit code once the
    /// container is torn down (runc state, overlay, its directories).
    pub async fn wait_forwarding(
        mut self,
        signals: &mut ForwardedSignals,
        grace: Duration,
    ) -> Result<i32, RuntimeError> {
        let killer = self.killer();
        let id = killer.id().to_string();
        let mut wait = tokio::task::spawn_blocking(move || {
            // On an error the container is dropped here: killed, deleted, unmounted.
            let code = self.wait()?;
            self.teardown()?;
            Ok(code)
        });
        let forward = |sig: i32| {
            let killer = killer.clone();
            // runc kill retries around start and exit: not on the runtime's threads.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = killer.kill(sig) {
                    tracing::warn!(container = killer.id(), signal = %signal_name(sig), error = %e, "passing a signal on failed");
                }
            })
        };
        let (mut kill_at, mut killed) = (None, false);
        loop {
            tokio::select! {
                code = &mut wait => {
                    return code.map_err(|e| RuntimeError::Config {
                        id: id.clone(),
                        reason: format!("waiting for the container: {e}"),
                    })?;
                }
                sig = signals.recv() => {
                    eprintln!("{}: passing it on to container {id}", signal_name(sig));
                    forward(sig);
                    kill_at.get_or_insert_with(|| tokio::time::Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)),
                    if kill_at.is_some() && !killed =>
                {
                    eprintln!("container {id} still runs {grace:?} after the signal: killing it");
                    forward(9);
                    // Once: a KILL cannot be ignored.
                    killed = true;
                }
            }
        }
    }
}
