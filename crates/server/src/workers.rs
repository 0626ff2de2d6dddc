//! A fixed pool of threads for requests whose backend may block (a file on a
//! slow disk, an fsync). Connection threads hand such requests over and go
//! on reading, so a slow request never stalls the ones queued behind it and
//! replies leave in completion order. The pool is shared by all connections,
//! so thousands of clients never mean thousands of extra threads.
//!
//! A connection with nothing else to do (one request, nothing in flight)
//! may run that request on its own thread instead, skipping two thread
//! hand-offs per round trip (see `Transmission::dispatch`). It first takes
//! a [`HereSlot`]: at most as many requests run on connection threads at
//! once as the pool has threads, so the number of storage calls that may
//! sleep at the same time stays bounded by the pool's size even with
//! thousands of connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use crossbeam_channel::{unbounded, Sender};

type Job = Box<dyn FnOnce() + Send>;

pub struct WorkerPool {
    jobs: Sender<Job>,
    /// Requests running on connection threads now (see [`HereSlot`]).
    here: AtomicUsize,
    /// How many may: the pool's size.
    here_limit: usize,
}

impl WorkerPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(WorkerPool {
            jobs: tx,
            here: AtomicUsize::new(0),
            here_limit: threads,
        })
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        // Workers live as long as the process, so the channel never closes.
        let _ = self.jobs.send(Box::new(job));
    }

    /// The right to run one request on a connection's own thread; `None`
    /// when as many already do as the pool has threads.
    pub fn here(&self) -> Option<HereSlot<'_>> {
        let taken = self.here.fetch_add(1, Ordering::Acquire);
        if taken >= self.here_limit {
            self.here.fetch_sub(1, Ordering::Release);
            return None;
        }
        Some(HereSlot(&self.here))
    }
}

/// One request running on a connection's thread; the slot is given back
/// when dropped.
pub struct HereSlot<'p>(&'p AtomicUsize);

impl Drop for HereSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_requests_run_on_connection_threads_than_the_pool_has_threads() {
        let pool = WorkerPool::new(2).unwrap();
        let first = pool.here().unwrap();
        let second = pool.here().unwrap();
        assert!(pool.here().is_none());
        drop(first);
        let third = pool.here();
        assert!(third.is_some());
        drop((second, third));
        assert_eq!(pool.here.load(Ordering::Relaxed), 0);
    }
}
