//! A fixed pool of threads for requests whose backend may block (a file on a
//! slow disk, an fsync). Connection threads hand such requests over and go
//! on reading, so a slow request never stalls the ones queued behind it and
//! replies leave in completion order. The pool is shared by all connections,
//! so thousands of clients never mean thousands of extra threads.

use std::thread;

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
