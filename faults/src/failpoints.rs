//! Crash points for the chaos suite: places where a test can make the process abort, as a power cut or
//! `kill -9` would at exactly that instant. They exist only in builds with the `failpoints` feature
//! (the test build); in every other build [`crash_point`] is an empty inline function and the arming
//! functions refuse.
//!
//! A crash point is armed with a `fail`-crate action string (`return` fires on every hit, `1*return`
//! once, `20%return` on one hit in five): at start through the `FAILPOINTS` environment variable
//! (`name=action;name=action`), at run time through `PUT /_node/v1/failpoints/{name}`.

/// The state machine applied a batch into its write transaction, and committed that transaction if
/// its commit was due (a shard holds it open for a few batches); the batch's replies are not sent yet.
pub const AFTER_APPLY_COMMIT: &str = "crash-after-apply-commit";
/// An append to the Raft log is durable; openraft has not been told yet, so nothing of it is
/// acknowledged to the leader or applied.
pub const AFTER_LOG_APPEND: &str = "crash-after-log-append";
/// A snapshot being installed is half written into the state machine's transaction, not committed.
pub const MID_SNAPSHOT_INSTALL: &str = "crash-mid-snapshot-install";
/// The log writer is about to write a leader's own entries, which openraft was told are flushed and
/// may have sent to the followers already: they are not durable here yet.
pub const BEFORE_EARLY_APPEND_WRITE: &str = "crash-before-early-append-write";

/// Every crash point there is.
pub const CRASH_POINTS: [&str; 4] = [
    AFTER_APPLY_COMMIT,
    AFTER_LOG_APPEND,
    MID_SNAPSHOT_INSTALL,
    BEFORE_EARLY_APPEND_WRITE,
];

/// Aborts the process here when the crash point `name` is armed and its action fires.
#[cfg(feature = "failpoints")]
pub fn crash_point(name: &'static str) {
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("crash point {name} fired: aborting");
        std::process::abort();
    }
}

/// Aborts the process here when the crash point `name` is armed (never: no `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn crash_point(_name: &'static str) {}

/// Whether this build has crash points at all.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Arms the crash point `name` with `actions`; `Err` for an unknown name or action string.
pub fn arm(name: &str, actions: &str) -> Result<(), String> {
    let name = known(name)?;
    #[cfg(feature = "failpoints")]
    {
        fail::cfg(name, actions)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (name, actions);
        Err("this build has no crash points (feature `failpoints`)".to_string())
    }
}

/// Disarms the crash point `name`.
pub fn disarm(name: &str) -> Result<(), String> {
    let name = known(name)?;
    #[cfg(feature = "failpoints")]
    fail::remove(name);
    let _ = name;
    Ok(())
}

/// Arms the crash points the `FAILPOINTS` environment variable lists (`name=action;…`); `Err` names
/// the first entry that is not a known crash point with a valid action.
pub fn arm_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS entry {entry:?} is not name=action"))?;
        arm(name.trim(), actions.trim()).map_err(|e| format!("FAILPOINTS entry {entry:?}: {e}"))?;
    }
    Ok(())
}

/// Whether `name` is one of [`CRASH_POINTS`].
pub fn is_known(name: &str) -> bool {
    known(name).is_ok()
}

fn known(name: &str) -> Result<&'static str, String> {
    CRASH_POINTS
        .into_iter()
        .find(|known| *known == name)
        .ok_or_else(|| format!("no crash point named {name:?}; there are {CRASH_POINTS:?}"))
}
