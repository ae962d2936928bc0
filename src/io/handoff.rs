//! Work handed from the event loops to a worker thread (the staging writer,
//! the durable-commit thread): an unbounded FIFO whose receiver parks as
//! soon as it finds nothing (a mutex and a condition variable), and whose
//! senders wake it only when it is parked.
//!
//! A crossbeam channel spins and then yields the CPU (`sched_yield`) a few
//! times before it parks an empty receiver: on the 2-core reference
//! machine, a worker that empties its queue after every file of a trickle
//! spent 6 % of a receiving secondary's CPU in those yields (each one a
//! switch to another runnable thread) at 1,000 messages/s. A job here is
//! one file or one flush, far longer than a wake-up, so there is nothing
//! to gain by spinning.
//!
//! Bounds: none here; each user bounds what it queues (the stager by
//! queued content bytes, the durable-commit thread by its callers' commit
//! pipelines).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiver: bool,
    /// The receiver is parked (or about to): a send must wake it.
    parked: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves only a queue of whole items.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side; cloned by every producer.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side, owned by the worker thread.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// The receiver is gone; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed<T>(pub T);

pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver: true,
            parked: false,
        }),
        ready: Condvar::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `item` after everything sent before it.
    pub fn send(&self, item: T) -> Result<(), Closed<T>> {
        let mut st = self.shared.lock();
        if !st.receiver {
            return Err(Closed(item));
        }
        st.items.push_back(item);
        let wake = std::mem::replace(&mut st.parked, false);
        drop(st);
        if wake {
            self.shared.ready.notify_one();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.senders -= 1;
        let last = st.senders == 0;
        drop(st);
        if last {
            self.shared.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once every sender is gone
    /// and the queue is empty. (`&mut`: one thread receives; the parked
    /// flag and a single notification assume it.)
    pub fn recv(&mut self) -> Option<T> {
        let mut st = self.shared.lock();
        loop {
            if let Some(item) = st.items.pop_front() {
                return Some(item);
            }
            if st.senders == 0 {
                return None;
            }
            st.parked = true;
            st = self
                .shared
                .ready
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Items never run are dropped here (a requester waiting on a reply
        // inside one hears that it is gone), and later sends fail.
        let items = {
            let mut st = self.shared.lock();
            st.receiver = false;
            std::mem::take(&mut st.items)
        };
        drop(items);
    }
}

impl<T> Iterator for Receiver<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_parked_receiver_is_woken_by_each_send_and_items_arrive_in_order() {
        let (tx, rx) = channel::<u32>();
        let (out, got) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in rx {
                if out.send(i).is_err() {
                    return;
                }
            }
        });
        let tx2 = tx.clone();
        let mut seen = Vec::new();
        for i in 0..200u32 {
            let s = if i % 2 == 0 { &tx } else { &tx2 };
            s.send(i).unwrap();
            if i % 20 == 0 {
                // Wait for the worker's answer with both senders alive: a
                // lost wake-up leaves it parked with the item queued. Then
                // it parks again (nothing queued) before the next send.
                while seen.last() != Some(&i) {
                    seen.push(
                        got.recv_timeout(Duration::from_secs(10))
                            .expect("a parked worker was woken by a send"),
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        drop(tx);
        tx2.send(200).unwrap();
        drop(tx2);
        seen.extend(got.iter());
        assert_eq!(seen, (0..=200).collect::<Vec<_>>());
    }

    #[test]
    fn a_send_after_the_receiver_is_gone_returns_the_item_and_queued_items_are_dropped() {
        let (tx, rx) = channel::<tokio::sync::oneshot::Sender<()>>();
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(reply).unwrap();
        drop(rx);
        assert!(
            answer.blocking_recv().is_err(),
            "a job queued and never run drops its reply"
        );
        let (reply, _answer) = tokio::sync::oneshot::channel();
        assert!(matches!(tx.send(reply), Err(Closed(_))));
    }
}
