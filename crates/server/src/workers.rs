//! A fixed pool of threads for requests whose backend may block (a file on a
//! slow disk, an fsync). Connection threads hand such requests over and go
//! on reading, so a slow request never stalls the ones queued behind it and
//! replies leave in completion order. The pool is shared by all connections,
//! so thousands of clients never mean thousands of extra threads.
//!
//! The queue is a plain list under a lock. An idle worker sleeps on a
//! condition variable without spinning first (on a small, shared machine a
//! spinning waiter takes the core the request's thread needs), and a new
//! job wakes a sleeping worker only when no wake-up already sent covers it:
//! a burst of jobs arriving while workers are busy or already waking costs
//! no system call per job. A worker takes the next job as soon as it is done
//! with one, without sleeping in between.
//!
//! A connection with nothing else to do (one request, nothing in flight)
//! may run that request on its own thread instead, skipping two thread
//! hand-offs per round trip (see `Transmission::dispatch`). It first takes
//! a [`HereSlot`]: at most as many requests run on connection threads at
//! once as the pool has threads, so the number of storage calls that may
//! sleep at the same time stays bounded by the pool's size even with
//! thousands of connections.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use scratchd_store::sync;

type Job = Box<dyn FnOnce() + Send>;

pub struct WorkerPool {
    queue: Arc<Queue>,
    /// Requests running on connection threads now (see [`HereSlot`]).
    here: AtomicUsize,
    /// How many may: the pool's size.
    here_limit: usize,
}

/// The jobs waiting for a worker, shared by the pool and its threads.
struct Queue {
    state: Mutex<Waiting>,
    /// Signalled once per job that needs a sleeping worker woken.
    ready: Condvar,
}

struct Waiting {
    jobs: VecDeque<Job>,
    /// Workers asleep on `ready` (including those woken but not yet
    /// running again).
    asleep: usize,
    /// Wake-ups sent that no worker has taken yet: each will take a job,
    /// so a new job needs one more only when it outnumbers them.
    waking: usize,
}

impl Waiting {
    /// Whether a job just queued needs a sleeping worker woken: no worker
    /// already woken will get to it, and one is asleep.
    fn needs_wake(&self) -> bool {
        self.asleep > self.waking && self.jobs.len() > self.waking
    }
}

impl WorkerPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let queue = Arc::new(Queue {
            state: Mutex::new(Waiting {
                jobs: VecDeque::new(),
                asleep: 0,
                waking: 0,
            }),
            ready: Condvar::new(),
        });
        for i in 0..threads {
            let queue = queue.clone();
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || queue.work())?;
        }
        Ok(WorkerPool {
            queue,
            here: AtomicUsize::new(0),
            here_limit: threads,
        })
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut st = sync::lock(&self.queue.state);
        st.jobs.push_back(Box::new(job));
        if st.needs_wake() {
            st.waking += 1;
            drop(st);
            self.queue.ready.notify_one();
        }
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

impl Queue {
    /// A worker's life: the next job, or sleep until one comes. Workers
    /// live as long as the process.
    fn work(&self) {
        let mut st = sync::lock(&self.state);
        loop {
            if let Some(job) = st.jobs.pop_front() {
                drop(st);
                job();
                st = sync::lock(&self.state);
                continue;
            }
            st.asleep += 1;
            st = sync::wait(&self.ready, st);
            st.asleep -= 1;
            // A spurious wake-up takes a wake-up meant for another; that
            // one is then sent again by the next job (never lost: a job
            // left behind is taken by the next worker that finishes).
            st.waking = st.waking.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

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

    /// Holds `n` workers of `pool` in jobs until the returned sender drops.
    fn occupy(pool: &WorkerPool, n: usize) -> mpsc::Sender<()> {
        let (release, held) = mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        let (started, running) = mpsc::channel();
        for _ in 0..n {
            let (held, started) = (held.clone(), started.clone());
            pool.submit(move || {
                started.send(()).unwrap();
                // Returns once the sender is dropped.
                let _ = sync::lock(&held).recv();
            });
        }
        for _ in 0..n {
            running.recv().unwrap();
        }
        release
    }

    #[test]
    fn jobs_queued_while_every_worker_is_busy_all_run_once_they_are_free() {
        let pool = WorkerPool::new(2).unwrap();
        let release = occupy(&pool, 2);
        let (done, finished) = mpsc::channel();
        for i in 0..100 {
            let done = done.clone();
            pool.submit(move || done.send(i).unwrap());
        }
        // Nobody was asleep to wake: the jobs wait for the busy workers.
        assert_eq!(sync::lock(&pool.queue.state).waking, 0);
        drop(release);
        let mut ran: Vec<i32> = (0..100).map(|_| finished.recv().unwrap()).collect();
        ran.sort_unstable();
        assert_eq!(ran, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_job_wakes_a_sleeper_only_when_no_wake_up_already_covers_it() {
        let job = || -> Job { Box::new(|| {}) };
        let mut st = Waiting {
            jobs: VecDeque::new(),
            asleep: 3,
            waking: 0,
        };
        for _ in 0..3 {
            st.jobs.push_back(job());
            assert!(st.needs_wake());
            st.waking += 1;
        }
        // A busy worker took a job first: the three wake-ups cover the rest
        // and one more.
        st.jobs.pop_front();
        st.jobs.push_back(job());
        assert!(!st.needs_wake());
        st.jobs.push_back(job());
        assert!(!st.needs_wake(), "nobody left asleep to wake");
    }

    #[test]
    fn many_threads_submitting_at_once_lose_no_job() {
        let pool = Arc::new(WorkerPool::new(3).unwrap());
        let (done, finished) = mpsc::channel();
        let submitters: Vec<_> = (0..4)
            .map(|t| {
                let (pool, done) = (pool.clone(), done.clone());
                thread::spawn(move || {
                    for i in 0..1000 {
                        let done = done.clone();
                        pool.submit(move || done.send(t * 1000 + i).unwrap());
                    }
                })
            })
            .collect();
        submitters.into_iter().for_each(|s| s.join().unwrap());
        let mut ran: Vec<i32> = (0..4000).map(|_| finished.recv().unwrap()).collect();
        ran.sort_unstable();
        assert_eq!(ran, (0..4000).collect::<Vec<_>>());
    }
}
