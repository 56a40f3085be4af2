//! Background tasks stopped together when their owner's user goes (a
//! layer fetcher's fetches and prefetch, a boot layer's chunk prefetch),
//! with a flag that keeps new ones from starting meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::task::{AbortHandle, JoinHandle};

#[derive(Default)]
pub(crate) struct Tasks {
    stopped: AtomicBool,
    handles: Mutex<Vec<AbortHandle>>,
}

impl Tasks {
    /// Remember `task` for [`Tasks::stop`] (finished ones are forgotten on
    /// the way); aborted at once when stopped already.
    pub fn track(&self, task: JoinHandle<()>) {
        let mut handles = self.handles.lock().unwrap();
        handles.retain(|t| !t.is_finished());
        handles.push(task.abort_handle());
        // Stopped meanwhile: stop() may have run before the push.
        if self.stopped() {
            task.abort();
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Abort every task and start no more: how many were running, or None
    /// when stopped already. The aborted are kept: [`Tasks::running`] tells
    /// when they are gone.
    pub fn stop(&self) -> Option<usize> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return None;
        }
        let handles = self.handles.lock().unwrap();
        let running = handles.iter().filter(|t| !t.is_finished()).count();
        for t in handles.iter() {
            t.abort();
        }
        Some(running)
    }

    /// Let tasks start again; true when they were stopped.
    pub fn restart(&self) -> bool {
        self.stopped.swap(false, Ordering::SeqCst)
    }

    /// Tasks not finished yet (after [`Tasks::stop`], those still unwinding).
    pub fn running(&self) -> usize {
        let handles = self.handles.lock().unwrap();
        handles.iter().filter(|t| !t.is_finished()).count()
    }
}
