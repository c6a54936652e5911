//! Loom model: the fault engine's monitor (`src/worker_pool.rs`) sleeps
//! with no deadline only while no handler is busy. A lost wake-up here
//! would leave a stuck pool without its rescuer, so the model drives the
//! real `begin_work` / `monitor_sleep` / `wake_monitor` and lets loom
//! report a deadlock if the monitor can sleep through a busy handler.
//!
//! Run with the loom command in the README.
#![cfg(loom)]

use loom::sync::atomic::AtomicBool;
use loom::sync::Arc;
use loom::thread;
use upcache::loom_support::WorkerPool;

/// A handler turns busy (and stays busy: its fault is stuck) while the
/// monitor goes to sleep: the monitor must come back.
#[test]
fn monitor_is_woken_by_a_busy_handler() {
    loom::model(|| {
        let pool = Arc::new(WorkerPool::new(1));
        let stop = AtomicBool::new(false);
        let p = pool.clone();
        let handler = thread::spawn(move || p.begin_work());
        pool.monitor_sleep(&stop);
        handler.join().unwrap();
    });
}

/// A handler's whole fault (busy, then done) around the monitor's sleep,
/// then a second fault that stays stuck: the monitor is awake for it.
#[test]
fn monitor_is_woken_by_the_second_of_two_faults() {
    loom::model(|| {
        let pool = Arc::new(WorkerPool::new(1));
        let stop = AtomicBool::new(false);
        let p = pool.clone();
        let handler = thread::spawn(move || {
            p.begin_work();
            p.end_work();
            p.begin_work();
        });
        pool.monitor_sleep(&stop);
        pool.monitor_sleep(&stop);
        handler.join().unwrap();
    });
}

/// A throttled write fault starts its pause while the monitor goes to
/// sleep: the monitor must come back to end the pause.
#[test]
fn monitor_is_woken_by_a_paused_fault() {
    loom::model(|| {
        let pool = Arc::new(WorkerPool::new(1));
        let stop = AtomicBool::new(false);
        let p = pool.clone();
        let throttler = thread::spawn(move || {
            p.begin_pause();
        });
        pool.monitor_sleep(&stop);
        throttler.join().unwrap();
    });
}

/// The engine's drop wakes a monitor asleep on an idle pool.
#[test]
fn stop_wakes_the_monitor() {
    loom::model(|| {
        let pool = Arc::new(WorkerPool::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pool.clone(), stop.clone());
        let dropper = thread::spawn(move || {
            s.store(true, loom::sync::atomic::Ordering::SeqCst);
            p.wake_monitor();
        });
        pool.monitor_sleep(&stop);
        dropper.join().unwrap();
    });
}

/// A throttled fault's pause ends twice at once: the flusher's pass is
/// over just as the monitor finds the pause due. Exactly one of them
/// releases the fault (a second release would wake its thread again and
/// grant it a second round of unthrottled faults), and the pool is left
/// with nothing paused, so the monitor can sleep.
#[test]
fn a_paused_fault_is_released_exactly_once() {
    loom::model(|| {
        let pool = Arc::new(WorkerPool::new(1));
        let id = pool.begin_pause();
        let p = pool.clone();
        let flusher = thread::spawn(move || usize::from(p.end_pause(id)));
        let by_monitor = pool.due_pauses();
        let by_flusher = flusher.join().unwrap();
        assert_eq!(by_monitor + by_flusher, 1, "released {by_monitor} + {by_flusher} times");
        assert!(!pool.any_work(), "a released pause still counts");
    });
}
