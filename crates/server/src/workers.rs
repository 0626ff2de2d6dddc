//! A fixed pool of threads for requests whose backend may block (a file on a
//! slow disk, an fsync). Connection threads hand such requests over and go
//! on reading, so a slow request never stalls the ones queued behind it and
//! replies leave in completion order. The pool is shared by all connections,
//! so thousands of clients never mean thousands of extra threads.

use std::sync::{Condvar, Mutex};
use std::thread;

use scratchd_store::sync;

use crossbeam_channel::{unbounded, Sender};

type Job = Box<dyn FnOnce() + Send>;

pub struct WorkerPool {
    jobs: Sender<Job>,
}

impl WorkerPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(WorkerPool { jobs: tx })
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        // Workers live as long as the process, so the channel never closes.
        let _ = self.jobs.send(Box::new(job));
    }
}

/// Counts one connection's requests that are still running elsewhere, to
/// bound them (memory per connection stays bounded) and to let DISC wait for
/// all of them before the connection closes.
pub struct InFlight {
    count: Mutex<usize>,
    changed: Condvar,
    limit: usize,
}

impl InFlight {
    pub fn new(limit: usize) -> Self {
        InFlight {
            count: Mutex::new(0),
            changed: Condvar::new(),
            limit,
        }
    }

    /// Waits for a free slot, then takes it.
    pub fn acquire(&self) {
        let mut n = sync::lock(&self.count);
        while *n >= self.limit {
            n = sync::wait(&self.changed, n);
        }
        *n += 1;
    }

    pub fn release(&self) {
        let mut n = sync::lock(&self.count);
        *n -= 1;
        self.changed.notify_all();
    }

    /// Waits until every request taken has been released.
    pub fn wait_idle(&self) {
        let mut n = sync::lock(&self.count);
        while *n > 0 {
            n = sync::wait(&self.changed, n);
        }
    }
}
