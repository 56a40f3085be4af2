//! The threads that serve FUSE requests which must wait for content (an
//! open or a read of bytes still on their way): a bounded set, started as
//! needed, with a bounded queue in front, so that the few FUSE worker
//! threads never wait and a burst of waiting requests cannot start threads
//! or hold memory without limit.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::panics::panic_message;

/// A request's work; it owns the request's reply, so dropping it unrun
/// answers the request EIO.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct WaitPool {
    state: Arc<State>,
    /// Its threads' name.
    name: &'static str,
    /// At most this many jobs run at once...
    threads: usize,
    /// ...and this many more wait for a thread.
    queue: usize,
}

#[derive(Default)]
struct State {
    inner: Mutex<Inner>,
    work: Condvar,
}

#[derive(Default)]
struct Inner {
    jobs: VecDeque<Job>,
    /// Threads started and not exited.
    started: usize,
    /// Of those, threads running a job.
    busy: usize,
    /// Set when the pool goes: threads exit once the queue is empty.
    closing: bool,
}

impl WaitPool {
    pub(crate) fn new(name: &'static str, threads: usize, queue: usize) -> WaitPool {
        WaitPool {
            state: Arc::default(),
            name,
            threads: threads.max(1),
            queue,
        }
    }

    /// Run `job` on a pool thread. When the queue is full (or no thread
    /// could be started) `job` comes back unrun: dropping it answers its
    /// request EIO, so the caller counts the refusal first.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        let mut inner = self.state.lock();
        if inner.busy + inner.jobs.len() >= self.threads + self.queue {
            return Err(job);
        }
        inner.jobs.push_back(job);
        // Threads not running a job (waiting, or started and about to look).
        let free = inner.started - inner.busy;
        if free >= inner.jobs.len() {
            self.state.work.notify_one();
            return Ok(());
        }
        if inner.started < self.threads {
            let state = self.state.clone();
            match std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || state.serve())
            {
                Ok(_) => inner.started += 1,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a thread for waiting requests");
                    if inner.started == 0 {
                        if let Some(job) = inner.jobs.pop_back() {
                            return Err(job);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for WaitPool {
    fn drop(&mut self) {
        self.state.lock().closing = true;
        self.state.work.notify_all();
    }
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pool thread: run jobs until the pool goes. A panicking job fails
    /// its own request (its reply is dropped: EIO), not the thread.
    fn serve(&self) {
        let mut inner = self.lock();
        loop {
            if let Some(job) = inner.jobs.pop_front() {
                inner.busy += 1;
                drop(inner);
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(job)) {
                    tracing::error!(panic = %panic_message(&*panic), "a waiting FUSE request panicked; answered EIO");
                }
                inner = self.lock();
                inner.busy -= 1;
                continue;
            }
            if inner.closing {
                inner.started -= 1;
                return;
            }
            inner = self
                .work
                .wait(inner)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Jobs past threads + queue are refused (dropped), the others all run.
    #[test]
    fn bounded_threads_and_queue() {
        let pool = WaitPool::new("test", 2, 3);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate_rx));
        let (done_tx, done_rx) = mpsc::channel();
        let mut accepted = 0;
        for i in 0..8 {
            let (gate, done) = (gate.clone(), done_tx.clone());
            let job: Job = Box::new(move || {
                let _ = gate.lock().unwrap().recv();
                done.send(i).unwrap();
            });
            if pool.submit(job).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 5);
        for _ in 0..accepted {
            gate_tx.send(()).unwrap();
        }
        let mut ran: Vec<i32> = (0..accepted)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        ran.sort();
        assert_eq!(ran, [0, 1, 2, 3, 4]);
        assert_eq!(pool.state.lock().started, 2);
    }
}
