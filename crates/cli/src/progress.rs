//! Progress bars for pulls: one bar per layer, drawn only on a terminal
//! (indicatif hides itself otherwise, so scripts get clean output).

use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lazylayer_oci::Digest;
use lazylayer_store::PullProgress;

use crate::context::short_digest;

pub struct PullBars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
    pub fetched: std::sync::atomic::AtomicU64,
    pub cached_layers: std::sync::atomic::AtomicU64,
    pub fetched_layers: std::sync::atomic::AtomicU64,
}

impl PullBars {
    pub fn new(quiet: bool) -> Self {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        PullBars {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
            fetched: 0.into(),
            cached_layers: 0.into(),
            fetched_layers: 0.into(),
        }
    }
}

impl PullProgress for PullBars {
    fn full_pull(&self, reference: &lazylayer_oci::Reference, note: Option<&str>) {
        match note {
            Some(n) => eprintln!("note: {reference}: {n}; pulling it fully"),
            None => eprintln!("note: {reference} has no lazylayer boot layer; pulling it fully (optimize it with `lazylayer optimize`, or attach one with `lazylayer optimize --attach`)"),
        }
    }
    fn layer_start(&self, digest: &Digest, size: u64, cached: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let bar = self.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {decimal_bytes:>9}/{decimal_total_bytes:<9} {decimal_bytes_per_sec:>11} {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(short_digest(digest));
        if cached {
            self.cached_layers.fetch_add(1, Relaxed);
            bar.set_position(size);
            bar.finish_with_message("already in store");
        } else {
            self.fetched_layers.fetch_add(1, Relaxed);
            bar.set_message("fetching");
        }
        self.bars.lock().unwrap().insert(digest.clone(), bar);
    }
    fn layer_bytes(&self, digest: &Digest, n: u64) {
        self.fetched
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = self.bars.lock().unwrap().get(digest) {
            b.inc(n);
        }
    }
    fn layer_resumed(&self, digest: &Digest, offset: u64) {
        // Kept from a cut fetch: shown as done, not counted as fetched.
        if let Some(b) = self.bars.lock().unwrap().get(digest) {
            b.set_position(offset);
            b.set_message("resumed");
        }
    }
    fn layer_done(&self, digest: &Digest) {
        if let Some(b) = self.bars.lock().unwrap().get(digest) {
            if !b.is_finished() {
                b.finish_with_message("done");
            }
        }
    }
}
