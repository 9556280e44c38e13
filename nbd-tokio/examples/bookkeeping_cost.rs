//! The per-command bookkeeping of the two designs the crate docs weigh,
//! alone, so an instruction counter can compare them:
//!
//! ```text
//! cargo build --release -p nbd-tokio --example bookkeeping_cost
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/bookkeeping_cost lock      # or: channel
//! ```
//!
//! Each mode runs the life of 200 000 commands on one thread with no
//! contention and no I/O: issue, a first poll of the future that finds
//! nothing, the driver's completion, the poll that takes the reply.
//!
//! - `lock` (the design chosen): a mutex around a map of slots keyed by
//!   cookie, an `Arc` per future, the driver woken through a `Notify`;
//! - `channel`: an unbounded channel carrying each command with a oneshot
//!   sender, which the driver keeps in a map by cookie until the reply.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::{mpsc, oneshot, Notify};

/// Commands per run.
const COMMANDS: u64 = 200_000;

/// What a reply carries, about the size of a completion.
type Payload = [u64; 12];

/// The crate's cookie hasher: one multiplication.
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ByCookie<V> = HashMap<u64, V, BuildHasherDefault<CookieHasher>>;

struct Slot {
    waker: Option<Waker>,
    done: Option<Payload>,
}

fn with_lock(cx: &mut Context<'_>) -> u64 {
    let state = Arc::new(Mutex::new(ByCookie::<Slot>::default()));
    let wake_driver = Notify::new();
    let mut sum = 0;
    for cookie in 0..COMMANDS {
        // Issue: the future keeps the shared state.
        let future_state = state.clone();
        future_state.lock().unwrap().insert(
            cookie,
            Slot {
                waker: None,
                done: None,
            },
        );
        wake_driver.notify_one();
        // First poll: nothing yet, the waker is kept.
        if let Some(slot) = future_state.lock().unwrap().get_mut(&cookie) {
            slot.waker = Some(cx.waker().clone());
        }
        // The driver: the reply into its slot, the task woken.
        if let Some(slot) = state.lock().unwrap().get_mut(&cookie) {
            slot.done = Some([cookie; 12]);
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
        // Second poll: the reply taken.
        let slot = future_state.lock().unwrap().remove(&cookie);
        sum += slot.and_then(|s| s.done).map_or(0, |d| d[3]);
    }
    sum
}

fn with_channel(cx: &mut Context<'_>) -> u64 {
    let (to_driver, mut driver) = mpsc::unbounded_channel::<(u64, oneshot::Sender<Payload>)>();
    let mut senders = ByCookie::<oneshot::Sender<Payload>>::default();
    let mut sum = 0;
    for cookie in 0..COMMANDS {
        // Issue: a oneshot per command, sent with it.
        let (reply_to, mut reply) = oneshot::channel();
        to_driver.send((cookie, reply_to)).unwrap();
        // First poll: nothing yet.
        let _ = Pin::new(&mut reply).poll(cx);
        // The driver: takes the command, keeps its sender until the reply.
        if let Ok((cookie, reply_to)) = driver.try_recv() {
            senders.insert(cookie, reply_to);
        }
        if let Some(reply_to) = senders.remove(&cookie) {
            let _ = reply_to.send([cookie; 12]);
        }
        // Second poll: the reply taken.
        if let Poll::Ready(Ok(done)) = Pin::new(&mut reply).poll(cx) {
            sum += done[3];
        }
    }
    sum
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let mut cx = Context::from_waker(Waker::noop());
    let sum = match mode.as_str() {
        "lock" => with_lock(&mut cx),
        "channel" => with_channel(&mut cx),
        _ => {
            eprintln!("usage: bookkeeping_cost lock|channel");
            std::process::exit(2);
        }
    };
    println!("{mode}: {COMMANDS} commands (checksum {sum})");
}
