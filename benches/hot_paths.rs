//! Micro-benchmarks of the work done for every request that needs no database: checking a
//! status transition, decoding and encoding a queue message, and validating a submission.
//!
//! Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use root_orchestrator::{RequestMessage, RequestStatus, TableConfig};

/// The example request shipped with the crate, in the wire shape.
const MESSAGE: &str = include_str!("../examples/requests/semaglutide_intelligence.json");

fn transitions(c: &mut Criterion) {
    c.bench_function("status: check all 36 transitions", |b| {
        b.iter(|| {
            let mut allowed = 0;
            for from in RequestStatus::ALL {
                for to in RequestStatus::ALL {
                    allowed += usize::from(black_box(from).transition(black_box(to)).is_ok());
                }
            }
            allowed
        })
    });
}

fn messages(c: &mut Criterion) {
    c.bench_function("message: decode and validate", |b| {
        b.iter(|| {
            RequestMessage::from_json(black_box(MESSAGE))
                .and_then(RequestMessage::into_new_request)
                .expect("the example is valid")
        })
    });

    let message = RequestMessage::from_json(MESSAGE).expect("the example parses");
    c.bench_function("message: encode", |b| {
        b.iter(|| serde_json::to_string(black_box(&message)).expect("encodes"))
    });
}

fn validation(c: &mut Criterion) {
    let request = RequestMessage::from_json(MESSAGE)
        .and_then(RequestMessage::into_new_request)
        .expect("the example is valid");
    c.bench_function("submission: validate", |b| {
        b.iter(|| black_box(&request).validate().expect("valid"))
    });

    let config = TableConfig::default();
    c.bench_function("table config: validate", |b| {
        b.iter(|| black_box(&config).validate().expect("valid"))
    });
}

criterion_group!(hot_paths, transitions, messages, validation);
criterion_main!(hot_paths);
