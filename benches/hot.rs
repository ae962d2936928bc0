//! Micro-benchmarks of the hot pieces: the frame codec, xxh3-128 hashing of
//! typical message sizes, and tracker coalescing under concurrent producers.
//!
//! ```sh
//! cargo bench --bench hot                 # everything
//! cargo bench --bench hot -- codec        # one group (codec | xxh3 | coalesce)
//! ```

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hasync::failover::{Heartbeat, Role};
use hasync::tracker::{Coalescer, Op, Tracker, TrackerConfig};
use hasync::wire::sync::{Meta, SyncMsg, DATA_BYTES_MAX};
use hasync::wire::{decode_frame, Message};
use xxhash_rust::xxh3::xxh3_128;

/// Deterministic message-like bytes: the fixtures' own generator.
fn mail_bytes(len: usize) -> Vec<u8> {
    let mut rng = hasync::failover::sim::SimRng::new(0x9E37_79B9_7F4A_7C15);
    hasync::fixture::message(&mut rng, len as u64)
}

fn heartbeat() -> Message {
    Message::Heartbeat(Heartbeat {
        node: "mx1.example.net".into(),
        role: Role::Primary,
        epoch: 41,
        seq: 1_234_567,
        priority: 200,
        flags: 0,
    })
}

fn file_msg() -> SyncMsg {
    SyncMsg::File {
        seq: 987_654,
        store: 0,
        path: b"user0042/Maildir/cur/1700012345.M123456P4242Q17.mx.example.net,S=10240:2,S"
            .to_vec(),
        meta: Meta {
            mode: 0o600,
            uid: 5000,
            gid: 5000,
            mtime_sec: 1_700_012_345,
            mtime_nsec: 123_456_789,
        },
        size: 10_240,
        hash: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        apart: false,
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");

    let hb = heartbeat();
    let hb_bytes = hb.to_frame_bytes();
    g.throughput(Throughput::Elements(1));
    g.bench_function("heartbeat/encode", |b| {
        let mut buf = Vec::with_capacity(128);
        b.iter(|| {
            buf.clear();
            black_box(&hb).encode(&mut buf);
            black_box(buf.len())
        })
    });
    g.bench_function("heartbeat/decode", |b| {
        b.iter(|| {
            let (frame, used) = decode_frame(black_box(&hb_bytes)).unwrap().unwrap();
            let msg = Message::decode(&frame).unwrap();
            black_box((msg, used))
        })
    });

    let file = file_msg();
    let mut file_bytes = Vec::new();
    file.encode(&mut file_bytes);
    g.bench_function("sync-file/encode", |b| {
        let mut buf = Vec::with_capacity(256);
        b.iter(|| {
            buf.clear();
            black_box(&file).encode(&mut buf);
            black_box(buf.len())
        })
    });
    g.bench_function("sync-file/decode", |b| {
        b.iter(|| {
            let (frame, _) = decode_frame(black_box(&file_bytes)).unwrap().unwrap();
            black_box(SyncMsg::decode(&frame).unwrap())
        })
    });

    for size in [4 << 10, 64 << 10, DATA_BYTES_MAX] {
        let data = SyncMsg::Data {
            seq: 987_654,
            bytes: mail_bytes(size),
        };
        let mut encoded = Vec::new();
        data.encode(&mut encoded);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("sync-data/encode", size),
            &data,
            |b, data| {
                let mut buf = Vec::with_capacity(size + 64);
                b.iter(|| {
                    buf.clear();
                    black_box(data).encode(&mut buf);
                    black_box(buf.len())
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("sync-data/decode", size),
            &encoded,
            |b, encoded| {
                b.iter(|| {
                    let (frame, _) = decode_frame(black_box(encoded)).unwrap().unwrap();
                    black_box(SyncMsg::decode(&frame).unwrap())
                })
            },
        );
    }

    // A stream of frames as the receiver sees it: File + Data per 10 KiB message.
    let mut stream = Vec::new();
    let msgs = 256;
    for i in 0..msgs {
        let mut f = file_msg();
        if let SyncMsg::File { seq, .. } = &mut f {
            *seq = i;
        }
        f.encode(&mut stream);
        SyncMsg::Data {
            seq: i,
            bytes: mail_bytes(10 << 10),
        }
        .encode(&mut stream);
    }
    g.throughput(Throughput::Elements(msgs));
    g.bench_function("stream-10KiB-messages/decode", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut n = 0;
            while let Some((frame, used)) = decode_frame(&stream[at..]).unwrap() {
                black_box(SyncMsg::decode(&frame).unwrap());
                at += used;
                n += 1;
            }
            assert_eq!(n, 2 * msgs);
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("xxh3");
    for (label, size) in [
        ("4KiB", 4usize << 10),
        ("10KiB", 10 << 10),
        ("100KiB", 100 << 10),
        ("1MiB", 1 << 20),
    ] {
        let data = mail_bytes(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("128", label), &data, |b, data| {
            b.iter(|| black_box(xxh3_128(black_box(data))))
        });
    }
    g.finish();
}

/// One round: `producers` threads each send `per_producer` Sync ops (paths
/// drawn from `distinct` names, so repeats coalesce) while the single consumer
/// drains and takes batches the way the sender does; returns the elapsed time
/// and the ops that came out.
fn coalesce_round(
    coalescer: &mut Coalescer,
    producers: usize,
    per_producer: usize,
    paths: &Arc<Vec<PathBuf>>,
) -> (Duration, usize) {
    let start = Arc::new(Barrier::new(producers + 1));
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..producers {
        let tx = coalescer.sender();
        let paths = paths.clone();
        let start = start.clone();
        handles.push(std::thread::spawn(move || {
            start.wait();
            let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (t as u64 + 1);
            for _ in 0..per_producer {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let rel = paths[(x % paths.len() as u64) as usize].clone();
                tx.send(Op::Sync {
                    store: 0,
                    rel,
                    since: Instant::now(),
                })
                .expect("consumer alive");
            }
        }));
    }
    let t0 = Instant::now();
    start.wait();
    let mut out = 0usize;
    let joiner = {
        let done = done.clone();
        std::thread::spawn(move || {
            for h in handles {
                h.join().expect("producer");
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    while !done.load(Ordering::SeqCst) {
        coalescer.drain();
        out += coalescer.take_batch(256).len();
    }
    joiner.join().expect("joiner");
    coalescer.drain();
    loop {
        let n = coalescer.take_batch(4096).len();
        if n == 0 {
            break;
        }
        out += n;
    }
    (t0.elapsed(), out)
}

fn coalescing(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tracker, mut coalescer) = Tracker::start(TrackerConfig {
        roots: vec![dir.path().to_path_buf()],
        exclude: vec![],
    })
    .expect("tracker");
    // Anything the tracker queued at start (nothing for an empty root).
    coalescer.drain();
    let _ = coalescer.take_batch(usize::MAX);

    let mut g = c.benchmark_group("coalesce");
    g.sample_size(20);
    let per_producer = 20_000;
    for distinct in [1_000usize, 100_000] {
        let paths: Arc<Vec<PathBuf>> = Arc::new(
            (0..distinct)
                .map(|i| {
                    PathBuf::from(format!(
                        "user{:04}/Maildir/new/1700000000.M{i}P4242.mx.example.net,S=10240",
                        i % 200
                    ))
                })
                .collect(),
        );
        for producers in [1usize, 2, 4] {
            g.throughput(Throughput::Elements((producers * per_producer) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("sync-ops/{distinct}-paths"), producers),
                &producers,
                |b, &producers| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let (d, out) =
                                coalesce_round(&mut coalescer, producers, per_producer, &paths);
                            assert!(out > 0 && out <= producers * per_producer);
                            total += d;
                        }
                        total
                    })
                },
            );
        }
    }
    g.finish();
    tracker.stop();
}

criterion_group!(benches, codec, hashing, coalescing);
criterion_main!(benches);
