//! `shopkeep-faults`: how the node's files fail, for every crate that writes one.
//!
//! Both the Raft log (`shopkeep-raft`) and the shard state machines (`shopkeep::state`) keep redb files
//! and must treat their faults alike; neither owns the rules, so they live here, below both:
//!
//! - [`disk`]: real faults. Every redb file sits on a backend that stops the process on an I/O error it
//!   cannot trust, and reports a full disk instead so that its owner can wait it out.
//! - [`integrity`]: corruption at rest, found when the node starts: every redb file is verified as it
//!   is opened; what is corrupt is set aside (or, on a single node, refused with restore advice).
//! - [`failpoints`]: simulated faults. Crash points where the chaos suite makes the process abort, as a
//!   power cut would (only in builds with the `failpoints` feature).
//!
//! It knows nothing about shops, and of Raft only where the node keeps its log (`integrity`, which must
//! verify it before anything opens it).

pub mod disk;
pub mod failpoints;
pub mod integrity;
