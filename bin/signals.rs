//! SIGINT and SIGTERM, taken as requests to stop cleanly.
//!
//! Both are blocked in every thread (the mask is set before any thread starts, and
//! threads inherit it) and received by one thread in `sigwait`, so that stopping is
//! ordinary code: it may lock, log and talk to a server, which a signal handler may not.
//! Children get an empty mask from std's `Command`, so commands and local workers still
//! die of these signals by default.
//!
//! With `distq-master`'s `kill` of a local worker, the only `unsafe` of the binaries:
//! the libc calls below, each on a local `sigset_t` that lives for the call.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked this process to stop (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The stop signals, as a set.
fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds valid signals.
    #[allow(unsafe_code)]
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM and starts the thread that receives them: `on_signal` runs
/// there with the signal's number for each one that arrives (the first asks for a clean
/// stop; an impatient second one may ask for a faster one). Call it first thing in
/// `main`, before any other thread exists, or those threads would still take the
/// signals' default action (death, with nothing cleaned up).
pub fn on_stop(on_signal: impl Fn(i32) + Send + 'static) {
    let set = stop_set();
    // SAFETY: `set` is a valid, initialised signal set; a null old-set pointer is allowed.
    #[allow(unsafe_code)]
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if blocked != 0 {
        // Without the mask the default action stays: no worse than before.
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("distq-signals".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is valid for the call and `signal` is a valid out pointer.
            #[allow(unsafe_code)]
            let waited = unsafe { libc::sigwait(&set, &mut signal) };
            if waited == 0 {
                let _ = RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
                on_signal(signal);
            }
        });
    if spawned.is_err() {
        // Nobody would receive them: unblock, so that they at least still stop us.
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// The signal that asked us to stop, if one did.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// `SIGINT` or `SIGTERM`, for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The shell's status for a process stopped by `signal`: 130 for SIGINT, 143 for SIGTERM.
pub fn exit_status(signal: i32) -> i32 {
    128 + signal
}
