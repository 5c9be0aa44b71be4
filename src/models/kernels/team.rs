//! A fixed team of compute threads for the decoder's matrix products, built for many tiny parallel
//! regions: a decode step runs ~200 of them (7 per layer), each a few tens of microseconds.
//!
//! rayon parks idle workers and wakes them through the kernel; measured on a 2-core decode step that
//! sleeping and waking was a third of the time. Here idle workers spin on one atomic for a short while
//! (ggml's thread pool does the same) and only then park, so back-to-back regions start within
//! nanoseconds, and an idle server costs nothing after the spin window.
//!
//! One 64-bit word holds the region's epoch, task count and next task index; a task is claimed by a
//! compare-and-swap that only succeeds while the epoch still matches, so a worker that is late to one
//! region can never run a task of the next one with the previous region's closure.
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking. Longer than the gap between two decode steps (the
/// engine thread hands tokens back to the batcher in tens of microseconds), short enough that an idle
/// server stops using CPU almost at once.
const SPIN: Duration = Duration::from_micros(500);
const MAX_TASKS: usize = 0xFFFF;

type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// epoch << 32 | tasks << 16 | next task.
    state: AtomicU64,
    /// A `*const Job` valid for the current epoch while its tasks are unfinished.
    job: AtomicPtr<()>,
    done: AtomicUsize,
    panicked: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Team {
    shared: Arc<Shared>,
    workers: usize,
    /// One region at a time (two models' engine threads may share the team).
    caller: Mutex<()>,
}

fn unpack(s: u64) -> (u64, u64, u64) {
    (s >> 32, (s >> 16) & 0xFFFF, s & 0xFFFF)
}

impl Shared {
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let (e, n, i) = unpack(cur);
            if e != epoch || i >= n {
                return None;
            }
            match self.state.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(i as usize),
                Err(now) => cur = now,
            }
        }
    }

    /// Runs claimed tasks of `epoch` until none are left; returns how many this thread ran.
    ///
    /// # Safety
    /// `job` must point at the closure of region `epoch` or of a later region. It is read only after a
    /// task of `epoch` has been claimed, which proves the region unfinished and its closure alive (a
    /// pointer read earlier may belong to a caller whose frame, or whole thread, is gone by now).
    unsafe fn work(&self, epoch: u64, job: *const Job<'_>) -> usize {
        let mut ran = 0;
        while let Some(t) = self.claim(epoch) {
            // SAFETY: see above.
            let f = unsafe { *job };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(t))) {
                self.panicked.store(true, Ordering::Release);
                *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            }
            ran += 1;
        }
        ran
    }
}

impl Team {
    /// The process-wide team, as wide as rayon's pool (which `--threads` sets), built on first use.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads()))
    }

    /// A team of `threads` including the calling thread.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = threads.max(1) - 1;
        for i in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("omnibus-team-{i}"))
                .spawn(move || worker(&s))
                .expect("spawn a compute thread");
        }
        Self { shared, workers, caller: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Calls `f(t)` for every `t` in `0..tasks`, spread over the team (the caller works too), and
    /// returns when all are done. A panic in any task is re-raised here after the others finish.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers == 0 || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        assert!(tasks <= MAX_TASKS, "{tasks} tasks in one region");
        let _one = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        s.done.store(0, Ordering::Relaxed);
        let job: Job<'_> = f;
        s.job.store(&job as *const Job<'_> as *mut (), Ordering::Release);
        let epoch = ((s.state.load(Ordering::Relaxed) >> 32) + 1) & 0xFFFF_FFFF;
        s.state.store(epoch << 32 | (tasks as u64) << 16, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // SAFETY: `job` is this region's closure, alive for the whole call.
        let mine = unsafe { s.work(epoch, &job) };
        // Every task must be finished before `f` (borrowed from our caller's frame) goes out of scope.
        if s.done.fetch_add(mine, Ordering::AcqRel) + mine < tasks {
            while s.done.load(Ordering::Acquire) < tasks {
                std::hint::spin_loop();
            }
        }
        if s.panicked.swap(false, Ordering::AcqRel)
            && let Some(p) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            resume_unwind(p);
        }
    }

    /// `f(first_row, rows_out)` over `out` (rows of `width`) in runs of whole rows, spread over the team
    /// when there are enough rows to pay for a region (a prompt, a batch) and on the caller otherwise (a
    /// decode step's one row). Each row is computed the same way whichever run it lands in, so the split
    /// never changes a bit.
    pub fn rows(&self, out: &mut [f32], width: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        // Below ~16k values of cheap work (a norm, a rotation) a region's hand-off costs about what the
        // work does. (4k, for these and the activation quantizers, was measured slower at 8 streams.)
        self.rows_from(16 * 1024, out, width, f)
    }

    /// [`Team::rows`] for work that pays for a region from `min_values` values up: an exponential per
    /// value (the SiLU gate) does from two rows of 1536 (8 decode rows' gate, 12k values, ran on the
    /// engine thread alone while the team spun: ~1.5% of an 8-row step on each core).
    pub fn rows_from(&self, min_values: usize, out: &mut [f32], width: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        assert!(width > 0 && out.len().is_multiple_of(width), "{} values in rows of {width}", out.len());
        let rows = out.len() / width;
        if self.workers == 0 || rows < 2 || out.len() < min_values {
            f(0, out);
            return;
        }
        let per = rows.div_ceil(self.threads() * 4).max(1);
        let tasks = rows.div_ceil(per);
        let parts = Disjoint::new(out);
        self.run(tasks, &|t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
            // SAFETY: task `t` alone gets rows r0..r1.
            f(r0, unsafe { parts.range(r0 * width..r1 * width) })
        });
    }
}

/// A buffer that the tasks of one region write in disjoint ranges.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only get the ranges they are handed, which the caller keeps disjoint (see `range`).
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Self { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: std::marker::PhantomData }
    }

    /// # Safety
    /// No two live slices from one `Disjoint` may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, r: std::ops::Range<usize>) -> &mut [T] {
        assert!(r.start <= r.end && r.end <= self.len, "range {r:?} of {}", self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }
}

fn worker(s: &Shared) {
    super::cpu::flush_denormals();
    let mut seen = 0u64;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.state.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && since.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.state.load(Ordering::SeqCst) >> 32 == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                since = Instant::now();
            }
        };
        seen = epoch;
        let ptr = s.job.load(Ordering::Acquire) as *const Job<'static>;
        // SAFETY: the pointer was stored before `epoch` was published (Release/Acquire), so it is this
        // region's or a later one's; if later, every claim for `epoch` fails and it is never read.
        let ran = unsafe { s.work(epoch, ptr) };
        if ran > 0 {
            s.done.fetch_add(ran, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows` hands every row to exactly one run, with its true index, split or not.
    #[test]
    fn rows_see_their_own_index_whether_split_or_not() {
        let team = Team::new(3);
        for (rows, width) in [(1, 8), (3, 8), (1000, 24), (257, 64)] {
            let mut out = vec![-1f32; rows * width];
            team.rows(&mut out, width, &|r0, part| {
                for (i, row) in part.chunks_exact_mut(width).enumerate() {
                    row.iter_mut().for_each(|v| *v += 1.0 + (r0 + i) as f32);
                }
            });
            let want: Vec<f32> = (0..rows).flat_map(|r| std::iter::repeat_n(r as f32, width)).collect();
            assert_eq!(out, want, "{rows} rows of {width}");
        }
    }

    #[test]
    fn every_task_runs_exactly_once_across_many_regions() {
        let team = Team::new(3);
        for round in 0..2000 {
            let tasks = 1 + round % 37;
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            team.run(tasks, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "round {round}");
        }
    }

    /// A region's closure lives on its caller's stack; callers on short-lived threads leave nothing behind
    /// for a late worker to read (this crashed before claims came first).
    #[test]
    fn callers_on_threads_that_exit() {
        let team = std::sync::Arc::new(Team::new(2));
        for _ in 0..300 {
            let t = team.clone();
            std::thread::spawn(move || {
                let n = AtomicUsize::new(0);
                t.run(4, &|_| {
                    n.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(n.load(Ordering::Relaxed), 4);
            })
            .join()
            .unwrap();
        }
    }

    #[test]
    fn workers_flush_subnormals() {
        let team = Team::new(3);
        let me = std::thread::current().id();
        let seen = Mutex::new(Vec::new());
        for _ in 0..50 {
            team.run(64, &|_| {
                std::thread::sleep(Duration::from_micros(20));
                seen.lock().unwrap().push((std::thread::current().id(), super::super::cpu::denormals_flushed()));
            });
        }
        let seen = seen.into_inner().unwrap();
        let workers: Vec<_> = seen.iter().filter(|(t, _)| *t != me).collect();
        assert!(!workers.is_empty(), "the workers ran no task");
        assert!(workers.iter().all(|(_, ftz)| *ftz), "a compute worker keeps subnormals");
    }

    #[test]
    fn wakes_parked_workers_and_reraises_panics() {
        let team = Team::new(2);
        std::thread::sleep(SPIN * 4);
        let sum = AtomicUsize::new(0);
        team.run(100, &|t| {
            sum.fetch_add(t, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
        let r = catch_unwind(AssertUnwindSafe(|| team.run(8, &|t| assert!(t != 5, "task five"))));
        assert!(r.is_err());
        // Still usable afterwards.
        let n = AtomicUsize::new(0);
        team.run(8, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
