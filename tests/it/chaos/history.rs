//! The history of a chaos run: every logical operation a client invoked, every attempt it made (one per
//! HTTP request, retried with the same idempotency key after an unknown outcome), and its final answer.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Wall-clock time in microseconds since the Unix epoch (the server stamps commands with the same clock).
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// Parses an RFC 3339 timestamp of the API into Unix microseconds.
#[track_caller]
pub fn micros_of(v: &Value) -> i64 {
    let t = crate::harness::ts(v);
    (t.unix_timestamp_nanos() / 1000) as i64
}

/// What one HTTP request gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A status < 500 other than 429: the server's answer about this key.
    Definite {
        status: u16,
        body: Value,
        replayed: bool,
    },
    /// 5xx, 429, a transport error or a timeout: the request may or may not have taken effect.
    Unknown(String),
}

#[derive(Clone, Debug)]
pub struct Attempt {
    /// Which of the op's concurrent senders made it (0 unless the op is a duplicate send).
    pub chain: usize,
    pub node: u64,
    /// Unix micros.
    pub start: i64,
    pub end: i64,
    pub outcome: Outcome,
}

/// A money amount in minor units.
pub type Cents = i64;

/// What an operation means, for the model.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    CreateUser,
    Credit {
        amount: Cents,
        external_ref: String,
    },
    Topup {
        amount: Cents,
    },
    Webhook {
        event_id: String,
        topup_id: String,
        succeeded: bool,
        amount: Cents,
        psp_payment_id: String,
        /// A replay of an earlier event (same event id, same body): op id of the first delivery.
        replay_of: Option<usize>,
    },
    Order {
        lines: Vec<(String, u32)>,
        complete: bool,
        expected_total: Option<Cents>,
    },
    Complete {
        order_id: String,
    },
    Cancel {
        order_id: String,
    },
    Refund {
        order_id: String,
        lines: Option<Vec<(String, u32)>>,
    },
    Consume {
        item_id: String,
        quantity: u32,
    },
    /// `POST …/credits/{credit_id}/reversals`: a reversal of a direct credit.
    Reversal {
        credit_id: String,
        amount: Cents,
        external_ref: String,
    },
    /// A PSP `payment.refunded`, `dispute.opened` or `dispute.closed` webhook of a completed top-up.
    PspReversal {
        event_id: String,
        event: PspEvent,
        topup_id: String,
        /// A replay of an earlier event (same event id, same body): op id of the first delivery.
        replay_of: Option<usize>,
    },
    /// The key of op `of` with another body: must be `422 idempotency_key_reused` and change nothing.
    KeyReuse {
        of: usize,
    },
    ReadWallet,
    ReadEntitlements,
    ReadOrder {
        order_id: String,
    },
}

/// What a PSP reversal webhook reports.
#[derive(Clone, Debug, PartialEq)]
pub enum PspEvent {
    Refunded {
        amount: Cents,
    },
    DisputeOpened {
        dispute_id: String,
        amount: Cents,
    },
    DisputeClosed {
        dispute_id: String,
        won: bool,
        amount: Option<Cents>,
    },
}

impl Spec {
    /// A short name, for the report.
    pub fn name(&self) -> &'static str {
        match self {
            Spec::CreateUser => "create_user",
            Spec::Credit { .. } => "credit",
            Spec::Topup { .. } => "topup",
            Spec::Webhook {
                replay_of: Some(_), ..
            } => "webhook_replay",
            Spec::Webhook { .. } => "webhook",
            Spec::Order { complete: true, .. } => "order_complete",
            Spec::Order { .. } => "order_pending",
            Spec::Complete { .. } => "complete",
            Spec::Cancel { .. } => "cancel",
            Spec::Refund { lines: None, .. } => "refund_full",
            Spec::Refund { .. } => "refund_partial",
            Spec::Consume { .. } => "consume",
            Spec::Reversal { .. } => "credit_reversal",
            Spec::PspReversal {
                replay_of: Some(_), ..
            } => "psp_reversal_replay",
            Spec::PspReversal {
                event: PspEvent::Refunded { .. },
                ..
            } => "psp_refunded",
            Spec::PspReversal {
                event: PspEvent::DisputeOpened { .. },
                ..
            } => "dispute_opened",
            Spec::PspReversal {
                event: PspEvent::DisputeClosed { .. },
                ..
            } => "dispute_closed",
            Spec::KeyReuse { .. } => "key_reuse",
            Spec::ReadWallet => "read_wallet",
            Spec::ReadEntitlements => "read_entitlements",
            Spec::ReadOrder { .. } => "read_order",
        }
    }

    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Spec::ReadWallet | Spec::ReadEntitlements | Spec::ReadOrder { .. }
        )
    }
}

/// One logical operation: a request (possibly sent by several concurrent senders with the same key) and
/// every attempt until a definite answer.
#[derive(Clone, Debug)]
pub struct Op {
    pub id: usize,
    pub worker: usize,
    pub user: String,
    pub spec: Spec,
    pub method: &'static str,
    pub path: String,
    /// The `Idempotency-Key` (None for the webhook, whose key is its event id, and for reads).
    pub key: Option<String>,
    /// The exact body bytes every attempt sends.
    pub body: Option<Vec<u8>>,
    /// How many senders send it at once (> 1: a duplicate send).
    pub senders: usize,
    pub attempts: Vec<Attempt>,
    /// Unix micros of the first attempt's start.
    pub invoked: i64,
    /// Unix micros of the end of the attempt whose answer was the last definite one (None: unresolved).
    pub completed: Option<i64>,
    /// Resolved only by the final retries after the run (it was still unknown when the workload stopped).
    pub resolved_after_run: bool,
}

impl Op {
    pub fn is_read(&self) -> bool {
        self.spec.is_read()
    }

    /// The definite answers, one per sender that got one.
    pub fn definite_answers(&self) -> Vec<(usize, u16, &Value)> {
        let mut per_chain: Vec<Option<(u16, &Value)>> = vec![None; self.senders];
        for a in &self.attempts {
            if let Outcome::Definite { status, body, .. } = &a.outcome {
                if per_chain[a.chain].is_none() {
                    per_chain[a.chain] = Some((*status, body));
                }
            }
        }
        per_chain
            .into_iter()
            .enumerate()
            .filter_map(|(c, a)| a.map(|(s, b)| (c, s, b)))
            .collect()
    }

    /// The op's answer: the first definite answer (every sender must have got the same one).
    pub fn answer(&self) -> Option<(u16, &Value)> {
        self.definite_answers().first().map(|(_, s, b)| (*s, *b))
    }

    pub fn had_unknown(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| matches!(a.outcome, Outcome::Unknown(_)))
    }

    pub fn ok(&self) -> bool {
        self.answer().is_some_and(|(s, _)| (200..300).contains(&s))
    }

    /// One line per attempt, for a violation's excerpt.
    pub fn describe(&self, t0: i64) -> String {
        let mut s = format!(
            "op #{} w{} user {} {} {} {} key={} senders={} invoked=+{:.3}s",
            self.id,
            self.worker,
            self.user,
            self.spec.name(),
            self.method,
            self.path,
            self.key.as_deref().unwrap_or("-"),
            self.senders,
            (self.invoked - t0) as f64 / 1e6
        );
        if let Some(b) = &self.body {
            s.push_str(&format!("\n      body {}", String::from_utf8_lossy(b)));
        }
        for a in &self.attempts {
            let what = match &a.outcome {
                Outcome::Definite {
                    status,
                    body,
                    replayed,
                } => {
                    let b = body.to_string();
                    let b: String = b.chars().take(600).collect();
                    format!("{status}{} {b}", if *replayed { " (replayed)" } else { "" })
                }
                Outcome::Unknown(why) => format!("UNKNOWN {why}"),
            };
            s.push_str(&format!(
                "\n      [sender {}] node {} +{:.3}s..+{:.3}s {what}",
                a.chain,
                a.node,
                (a.start - t0) as f64 / 1e6,
                (a.end - t0) as f64 / 1e6
            ));
        }
        s
    }
}

/// Every op of a run, shared by the workers.
#[derive(Clone, Default)]
pub struct History {
    ops: Arc<Mutex<Vec<Op>>>,
    next_id: Arc<std::sync::atomic::AtomicUsize>,
}

impl History {
    pub fn next_id(&self) -> usize {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    pub fn push(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    /// Every op, by id.
    pub fn snapshot(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().unwrap().clone();
        ops.sort_by_key(|o| o.id);
        ops
    }

    pub fn len(&self) -> usize {
        self.ops.lock().unwrap().len()
    }
}

/// One fault injected by the nemesis (or its end), relative to the run's start.
#[derive(Clone, Debug)]
pub struct FaultEvent {
    /// Unix micros.
    pub at: i64,
    pub kind: &'static str,
    pub what: String,
}

/// The nemesis's log.
#[derive(Clone, Default)]
pub struct Timeline {
    events: Arc<Mutex<Vec<FaultEvent>>>,
}

impl Timeline {
    pub fn log(&self, t0: i64, kind: &'static str, what: impl Into<String>) {
        let ev = FaultEvent {
            at: unix_micros(),
            kind,
            what: what.into(),
        };
        eprintln!(
            "[chaos +{:8.3}s] {:<10} {}",
            (ev.at - t0) as f64 / 1e6,
            ev.kind,
            ev.what
        );
        self.events.lock().unwrap().push(ev);
    }

    pub fn events(&self) -> Vec<FaultEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn render(&self, t0: i64) -> String {
        self.events()
            .iter()
            .map(|e| {
                format!(
                    "  +{:8.3}s {:<10} {}\n",
                    (e.at - t0) as f64 / 1e6,
                    e.kind,
                    e.what
                )
            })
            .collect()
    }
}
