//! The order in which a run does and undoes its steps, driven with steps
//! that record what they do (and what dropping their values undoes) and
//! fail or wait where a test says.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use lazylayer_runtime::{ContainerState, ContainerStatus, RunSpec};

use super::{run, RunSteps, SignalSource};
use crate::{LazyStats, RunError, RunReport};

type Log = Rc<RefCell<Vec<String>>>;

fn note(log: &Log, what: &str) {
    log.borrow_mut().push(what.to_string());
}

/// Logs `what` when dropped: a root unmounted, a status writer stopped, a
/// container torn down, a prepare cancelled.
struct Undo(Log, &'static str);

impl Drop for Undo {
    fn drop(&mut self) {
        note(&self.0, self.1);
    }
}

/// Signals that arrive in this order; none after them. Each arrives a
/// turn after it is asked for, so the step it races has started (a
/// `select!` polls its branches in random order).
struct Signals(VecDeque<i32>);

impl SignalSource for Signals {
    async fn recv(&mut self) -> i32 {
        tokio::task::yield_now().await;
        match self.0.pop_front() {
            Some(s) => s,
            None => std::future::pending().await,
        }
    }
}

#[derive(Default)]
struct Steps {
    log: Log,
    lazy: bool,
    /// The step (as logged) that fails.
    fail: Option<&'static str>,
    /// Prepare waits for ever (a signal has to end the run).
    prepare_waits: bool,
    /// A signal that arrives while the container runs, after its exit.
    signal_at_exit: Option<i32>,
    /// Fetches take for ever (the finish bound is the real step's).
    fetches_wait: bool,
    exit_code: i32,
}

impl Steps {
    #[allow(clippy::result_large_err)]
    fn step(&self, what: &str) -> Result<(), RunError> {
        note(&self.log, what);
        if self.fail == Some(what) {
            return Err(RunError::Config {
                image: "test".into(),
                reason: format!("{what} failed"),
            });
        }
        Ok(())
    }

    fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }
}

impl RunSteps for Steps {
    type Root = (Undo, bool);
    type Status = Undo;
    type Container = Undo;
    type Signals = Signals;

    fn write_state(&self, state: &ContainerState) -> Result<(), RunError> {
        let what = match (&state.status, state.exit_code, state.lazy) {
            (ContainerStatus::Exited, Some(_), _) => "record exited",
            (ContainerStatus::Running, None, true) => "record running lazily",
            (ContainerStatus::Running, None, false) => "record running",
            other => panic!("recorded {other:?}"),
        };
        self.step(what)
    }

    async fn prepare(&self) -> Result<(Self::Root, RunSpec), RunError> {
        if self.prepare_waits {
            let _cancelled = Undo(self.log.clone(), "prepare cancelled");
            std::future::pending::<()>().await;
        }
        self.step("root mounted")?;
        let spec = RunSpec::new("c", PathBuf::new(), Default::default());
        Ok(((Undo(self.log.clone(), "root unmounted"), self.lazy), spec))
    }

    fn is_lazy(root: &Self::Root) -> bool {
        root.1
    }

    fn is_native(root: &Self::Root) -> bool {
        !root.1
    }

    fn lazy_stats(root: &Self::Root) -> Option<LazyStats> {
        root.1.then(|| LazyStats {
            offline: false,
            layers: 2,
            layers_on_demand: 1,
            bytes_fetched: 0,
            passthrough_opens: 0,
            daemon_opens: 0,
            fs_requests: 0,
            read_requests: 0,
            preloaded_bytes: 0,
            kernel_opens: false,
            layer_status: Vec::new(),
        })
    }

    fn start_status(&self, root: &Self::Root) -> Option<Self::Status> {
        assert!(root.1, "a status writer for a root that is not lazy");
        note(&self.log, "status writer started");
        Some(Undo(self.log.clone(), "status writer stopped"))
    }

    fn start_container(&self, _: &Self::Root, spec: RunSpec) -> Result<Undo, RunError> {
        assert_eq!(spec.id, "c");
        self.step("container started")?;
        Ok(Undo(self.log.clone(), "container torn down"))
    }

    async fn wait(&self, container: Undo, signals: &mut Signals) -> Result<i32, RunError> {
        signals.0.extend(self.signal_at_exit);
        note(&self.log, "container exited");
        drop(container);
        self.step("exit code read")?;
        Ok(self.exit_code)
    }

    async fn finish_fetching(&self, _: &Self::Root) {
        note(&self.log, "fetches finishing");
        if self.fetches_wait {
            std::future::pending::<()>().await;
        }
        note(&self.log, "fetches finished");
    }

    fn remove_dir(&self) {
        note(&self.log, "directory removed");
    }
}

fn running() -> ContainerState {
    ContainerState {
        name: "c".into(),
        image: "reg/app:boot".into(),
        created: 0,
        status: ContainerStatus::Running,
        exit_code: None,
        pid: std::process::id(),
        lazy: false,
        pid_start: None,
        rm: false,
        pin: Some("run-c".into()),
        owner_lost: false,
    }
}

async fn run_with(steps: &Steps, rm: bool, signals: &[i32]) -> Result<RunReport, RunError> {
    let mut signals = Signals(signals.iter().copied().collect());
    run(steps, running(), rm, Instant::now(), &mut signals).await
}

const LAZY_RUN: [&str; 10] = [
    "record running",
    "root mounted",
    "record running lazily",
    "status writer started",
    "container started",
    "container exited",
    "container torn down",
    "exit code read",
    "fetches finishing",
    "fetches finished",
];

fn lazy_run_then(rest: &[&str]) -> Vec<String> {
    LAZY_RUN.iter().chain(rest).map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_lazy_run_is_undone_in_reverse_and_keeps_its_directory() {
    let steps = Steps {
        lazy: true,
        exit_code: 3,
        ..Default::default()
    };
    let report = run_with(&steps, false, &[]).await.unwrap();
    assert_eq!(
        steps.log(),
        lazy_run_then(&["status writer stopped", "root unmounted", "record exited"])
    );
    assert_eq!(report.code, 3);
    assert!(report.started && report.t_ready.is_some() && !report.native);
    assert_eq!(report.lazy.map(|l| l.layers), Some(2));
}

#[tokio::test]
async fn with_rm_the_directory_goes_last() {
    let steps = Steps {
        lazy: true,
        ..Default::default()
    };
    run_with(&steps, true, &[]).await.unwrap();
    assert_eq!(
        steps.log(),
        lazy_run_then(&[
            "status writer stopped",
            "root unmounted",
            "record exited",
            "directory removed"
        ])
    );
}

#[tokio::test]
async fn a_root_local_whole_has_no_status_writer_and_no_fetches_to_finish() {
    let steps = Steps::default();
    let report = run_with(&steps, false, &[]).await.unwrap();
    assert_eq!(
        steps.log(),
        [
            "record running",
            "root mounted",
            "record running",
            "container started",
            "container exited",
            "container torn down",
            "exit code read",
            "root unmounted",
            "record exited",
        ]
    );
    assert!(report.native && report.lazy.is_none());
}

#[tokio::test]
async fn a_container_that_fails_to_start_leaves_no_status_root_or_directory() {
    let steps = Steps {
        lazy: true,
        fail: Some("container started"),
        ..Default::default()
    };
    assert!(run_with(&steps, false, &[]).await.is_err());
    assert_eq!(
        steps.log(),
        [
            "record running",
            "root mounted",
            "record running lazily",
            "status writer started",
            "container started",
            "status writer stopped",
            "root unmounted",
            "directory removed",
        ]
    );
}

#[tokio::test]
async fn a_failed_wait_tears_down_the_container_then_the_status_then_the_root() {
    let steps = Steps {
        lazy: true,
        fail: Some("exit code read"),
        ..Default::default()
    };
    assert!(run_with(&steps, false, &[]).await.is_err());
    let log = steps.log();
    assert_eq!(
        log[4..],
        [
            "container started",
            "container exited",
            "container torn down",
            "exit code read",
            "status writer stopped",
            "root unmounted",
            "directory removed",
        ]
    );
    assert!(!log.iter().any(|s| s.starts_with("fetches")), "{log:?}");
}

#[tokio::test]
async fn a_signal_before_the_start_cancels_the_prepare_and_removes_the_directory() {
    let steps = Steps {
        prepare_waits: true,
        ..Default::default()
    };
    let report = run_with(&steps, false, &[15]).await.unwrap();
    assert_eq!(
        steps.log(),
        ["record running", "prepare cancelled", "directory removed"]
    );
    assert_eq!(report.code, 128 + 15);
    assert!(!report.started && report.t_ready.is_none());
}

#[tokio::test]
async fn a_signal_after_the_exit_cuts_the_wait_for_fetches_short() {
    let steps = Steps {
        lazy: true,
        fetches_wait: true,
        signal_at_exit: Some(2),
        exit_code: 0,
        ..Default::default()
    };
    let report = run_with(&steps, false, &[]).await.unwrap();
    let mut want = lazy_run_then(&["status writer stopped", "root unmounted", "record exited"]);
    want.retain(|s| s != "fetches finished");
    assert_eq!(steps.log(), want);
    assert_eq!(report.code, 0, "the container's code, not the signal's");
}

#[tokio::test]
async fn nothing_is_prepared_when_the_first_record_cannot_be_written() {
    let steps = Steps {
        lazy: true,
        fail: Some("record running"),
        ..Default::default()
    };
    assert!(run_with(&steps, false, &[]).await.is_err());
    assert_eq!(steps.log(), ["record running", "directory removed"]);
}

#[tokio::test]
async fn a_failed_prepare_or_lazy_record_removes_the_directory_after_the_root() {
    let steps = Steps {
        lazy: true,
        fail: Some("root mounted"),
        ..Default::default()
    };
    assert!(run_with(&steps, true, &[]).await.is_err());
    assert_eq!(
        steps.log(),
        ["record running", "root mounted", "directory removed"]
    );
    let steps = Steps {
        lazy: true,
        fail: Some("record running lazily"),
        ..Default::default()
    };
    assert!(run_with(&steps, false, &[]).await.is_err());
    assert_eq!(
        steps.log(),
        [
            "record running",
            "root mounted",
            "record running lazily",
            "root unmounted",
            "directory removed"
        ]
    );
}

#[tokio::test]
async fn a_failed_exit_record_comes_after_the_teardown_and_removes_the_directory() {
    let steps = Steps {
        lazy: true,
        fail: Some("record exited"),
        ..Default::default()
    };
    assert!(run_with(&steps, false, &[]).await.is_err());
    assert_eq!(
        steps.log(),
        lazy_run_then(&[
            "status writer stopped",
            "root unmounted",
            "record exited",
            "directory removed"
        ])
    );
}
