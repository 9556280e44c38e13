//! The workers of one copy on their threads: the first on the calling
//! thread with the ends already open, the others on threads of their own,
//! each opening its own ends; and the progress reporter beside them.

use std::io;
use std::thread;

use nbd_blocking::Error;

use super::open::Opened;
use super::plan::Plan;
use super::progress::{self, Counter};
use super::worker::{Destination, Done, Settings, Source, Worker};

/// Runs `workers` workers over `plan` until it is done or one has failed,
/// with progress shown as `reporter` asks (out of `size`, where known).
/// Returns each worker's result, the first worker's first; a worker that
/// could not open its ends takes no part (the others copy its share) and
/// has no result.
pub fn run(
    source: Opened<Source>,
    destination: Opened<Destination>,
    settings: &Settings,
    plan: &Plan,
    size: Option<u64>,
    reporter: Option<(progress::Target, Option<progress::Lines>)>,
    workers: usize,
) -> Vec<Result<Done, Error>> {
    let counter = Counter::default();
    let counter = &counter;
    thread::scope(|scope| {
        let reporter = reporter.map(|(target, lines)| {
            scope.spawn(move || progress::report(target, size, counter, lines))
        });
        let (src_again, dst_again) = (&source.again, &destination.again);
        let helpers: Vec<_> = (1..workers)
            .map(|_| {
                scope.spawn(move || {
                    let ends = src_again
                        .source()
                        .and_then(|s| Ok((s, dst_again.destination()?)));
                    match ends {
                        Ok((s, d)) => Worker::new(s, d, settings, plan, counter, size)
                            .run()
                            .map(Some),
                        // A server may advertise multi-conn and still turn
                        // extra clients away: the pieces go to the workers
                        // that did connect, so the copy is whole all the same.
                        Err(_) => Ok(None),
                    }
                })
            })
            .collect();
        let first = Worker::new(
            source.first,
            destination.first,
            settings,
            plan,
            counter,
            size,
        );
        let mut results = vec![first.run()];
        for helper in helpers {
            let result = helper
                .join()
                .unwrap_or_else(|_| Err(Error::Io(io::Error::other("a copy worker panicked"))));
            match result {
                Ok(Some(done)) => results.push(Ok(done)),
                Ok(None) => {}
                Err(e) => results.push(Err(e)),
            }
        }
        counter.finish();
        if let Some(reporter) = reporter {
            reporter.thread().unpark();
            // The reporter only sleeps and prints; if it panicked the copy stands.
            let _ = reporter.join();
        }
        results
    })
}
