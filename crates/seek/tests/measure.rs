//! Span-size measurement on a real layer (ignored: needs a blob). Run as
//! `LAZYLAYER_SEEK_BLOB=path LAZYLAYER_SEEK_PATHS=a,b cargo test -p
//! lazylayer-seek --release --test measure -- --ignored --nocapture`.
//! Prints, per span, the encoded index size and its head's, the compressed
//! bytes the named files' plans cover (overlapping plans counted once), the
//! windows those plans need (each once), what a reader fetches for them
//! (head + windows + spans), and the mean plan length over every file of
//! the layer.

use lazylayer_seek::{head_len, SeekHead, SeekIndex};

#[test]
#[ignore]
fn measure_spans() {
    let Ok(blob) = std::env::var("LAZYLAYER_SEEK_BLOB") else {
        return;
    };
    let paths = std::env::var("LAZYLAYER_SEEK_PATHS").unwrap_or_default();
    let data = std::fs::read(&blob).unwrap();
    println!("blob {} bytes", data.len());
    for span in [64u64, 128, 256, 512, 1024].map(|k| k * 1024) {
        let idx = SeekIndex::build(&data[..], span).unwrap();
        let enc = idx.encode();
        let head_bytes = head_len(&enc).unwrap();
        let head = SeekHead::decode(&enc).unwrap();
        let mut windows = std::collections::BTreeSet::new();
        let mut ranges: Vec<(u64, u64)> = paths
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let f = idx.file(p.as_bytes()).unwrap_or_else(|| panic!("{p}"));
                let plan = idx.plan(f.offset, f.size);
                windows.insert(plan.checkpoint);
                (plan.compressed_start, plan.compressed_end)
            })
            .collect();
        let window_bytes: u64 = windows
            .iter()
            .map(|&i| u64::from(head.window(i).unwrap().deflated_len))
            .sum();
        ranges.sort();
        let (mut covered, mut end) = (0, 0);
        for (s, e) in ranges {
            let s = s.max(end);
            if e > s {
                covered += e - s;
                end = e;
            }
        }
        let all: u64 = idx
            .files
            .iter()
            .map(|(_, f)| idx.plan(f.offset, f.size).compressed_len())
            .sum();
        println!(
            "span {:>5} KiB: {:>4} checkpoints, index {:>8} bytes, head {:>7}, named files' spans {:>8} bytes, their windows {:>6}, head + windows + spans {:>8}, mean plan {:>7} bytes",
            span / 1024,
            idx.checkpoints.len(),
            enc.len(),
            head_bytes,
            covered,
            window_bytes,
            head_bytes + window_bytes + covered,
            all / idx.files.len().max(1) as u64
        );
    }
}
