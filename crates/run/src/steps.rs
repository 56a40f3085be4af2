//! The order of a run: what is done, and undone in reverse, also when a
//! step fails or a signal comes first. The effects (the record, the mounts,
//! runc) sit behind [`RunSteps`], so that this order is plain code the tests
//! in `steps/tests.rs` drive with recorded steps.

use std::time::Instant;

use lazylayer_runtime::{signal_name, ContainerState, ContainerStatus, ForwardedSignals, RunSpec};

use crate::{LazyStats, RunError, RunReport};

/// Where the signals the caller receives come from.
pub(crate) trait SignalSource {
    /// The next signal's number.
    async fn recv(&mut self) -> i32;
}

impl SignalSource for ForwardedSignals {
    async fn recv(&mut self) -> i32 {
        ForwardedSignals::recv(self).await
    }
}

/// One run's effects. Undoing is dropping: a root is unmounted (its pin
/// taken off) when dropped, a status writer stops, and a container is torn
/// down (its overlay first) by [`RunSteps::wait`] or when dropped.
// The steps return the crate's own (public) error, as `run_container` does.
#[allow(clippy::result_large_err)]
pub(crate) trait RunSteps {
    type Root;
    type Status;
    type Container;
    type Signals: SignalSource;

    /// Record `state` in the container's directory.
    fn write_state(&self, state: &ContainerState) -> Result<(), RunError>;
    /// The container's root, mounted, and what to run on it.
    async fn prepare(&self) -> Result<(Self::Root, RunSpec), RunError>;
    /// Whether `root` is lazy: a status to write, fetches to finish.
    fn is_lazy(root: &Self::Root) -> bool;
    /// Whether `root` is the store's layers under overlayfs, without FUSE.
    fn is_native(root: &Self::Root) -> bool;
    /// What a lazy root served and fetched.
    fn lazy_stats(root: &Self::Root) -> Option<LazyStats>;
    /// Start rewriting a lazy root's per-layer status.
    fn start_status(&self, root: &Self::Root) -> Option<Self::Status>;
    fn start_container(
        &self,
        root: &Self::Root,
        spec: RunSpec,
    ) -> Result<Self::Container, RunError>;
    /// The container's exit code, signals passed on meanwhile; the
    /// container is torn down by then.
    async fn wait(
        &self,
        container: Self::Container,
        signals: &mut Self::Signals,
    ) -> Result<i32, RunError>;
    /// Give a lazy root's fetches their bounded time after the exit.
    async fn finish_fetching(&self, root: &Self::Root);
    /// Remove the container's directory (failures are logged).
    fn remove_dir(&self);
}

/// Run to the end: `state` recorded first, the directory removed at the
/// end with `rm` or when the container never started.
pub(crate) async fn run<S: RunSteps>(
    steps: &S,
    state: ContainerState,
    rm: bool,
    t0: Instant,
    signals: &mut S::Signals,
) -> Result<RunReport, RunError> {
    // From here on, the directory is ours: remove it on any early error.
    // The record goes first: should we be killed outright from here on, it names
    // the owner and what to clear (`ContainerDir::reap_orphans`).
    let result = match steps.write_state(&state) {
        Ok(()) => run_recorded(steps, state, t0, signals).await,
        Err(e) => Err(e),
    };
    // A container that never started leaves nothing worth keeping.
    if rm || !matches!(result, Ok(RunReport { started: true, .. })) {
        steps.remove_dir();
    }
    result
}

async fn run_recorded<S: RunSteps>(
    steps: &S,
    state: ContainerState,
    t0: Instant,
    signals: &mut S::Signals,
) -> Result<RunReport, RunError> {
    let name = state.name.clone();
    // A signal before the start ends the run: dropping `prepare` unmounts
    // what it mounted, and the caller removes the directory.
    let (root, spec) = tokio::select! {
        p = steps.prepare() => p?,
        sig = signals.recv() => {
            eprintln!("{}: stopping before container {name} started", signal_name(sig));
            return Ok(RunReport { code: 128 + sig, started: false, t_ready: None, lazy: None, native: false });
        }
    };
    let t_ready = t0.elapsed();
    let lazy = S::is_lazy(&root);
    let state = ContainerState { lazy, ..state };
    steps.write_state(&state)?;
    let status = if lazy {
        steps.start_status(&root)
    } else {
        None
    };

    // The overlay over the lowers, the bundle and runc, in the container's
    // directory; the writable layer outlives the run unless --rm.
    let container = steps.start_container(&root, spec)?;
    let code = steps.wait(container, signals).await?;
    if lazy {
        // Bounded; a signal ends it at once (what arrived is kept).
        tokio::select! {
            _ = steps.finish_fetching(&root) => {}
            _ = signals.recv() => {}
        }
    }
    drop(status);
    let lazy = S::lazy_stats(&root);
    let native = S::is_native(&root);
    // The container is torn down (its overlay first): now the root goes,
    // the image recorded once every layer arrived (the next run then
    // needs no network).
    drop(root);
    steps.write_state(&ContainerState {
        status: ContainerStatus::Exited,
        exit_code: Some(code),
        ..state
    })?;
    Ok(RunReport {
        code,
        started: true,
        t_ready: Some(t_ready),
        lazy,
        native,
    })
}

#[cfg(test)]
mod tests;
