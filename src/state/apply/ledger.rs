//! The ledger: the only way money moves (`post`: a hash-chained double-entry posting, the user's ledger
//! entry, the wallet cache and the system accounts together), and the exact checks every posting passes
//! first (`Accounts::after`, `check_postings`).

use sha2::{Digest, Sha256};

use super::{Applier, CommandContext, Step};
use crate::domain::{Money, Posting, PostingKind, PostingRef, Rejection, Timestamp, User};
use crate::state::StoreError;
use crate::state::tables::{decode, encode};
use crate::state::user_rows;

impl Applier<'_> {
    fn accounts(&self, user: &User) -> Accounts {
        Accounts {
            balance: user.balance,
            held: user.held,
            psp_clearing: self.meta.psp_clearing,
            revenue: self.meta.revenue,
            receivable: self.receivable,
        }
    }

    /// Decides, before a command writes anything, that `postings` (in order) can all be made on `user`'s
    /// wallet: each amount non-negative, every account in range, `0 ≤ held ≤ balance` after each.
    pub(super) fn check_postings(
        &self,
        user: &User,
        postings: &[(PostingKind, Money)],
    ) -> Step<()> {
        let mut accounts = self.accounts(user);
        for &(kind, amount) in postings {
            accounts = accounts.after(kind, amount)?;
        }
        Ok(())
    }

    /// Moves `amount` between the accounts of `kind` on `user`'s wallet: writes the posting (hash-chained),
    /// the user's ledger entry, and updates the wallet cache and the system accounts. Zero moves nothing.
    pub(super) fn post(
        &mut self,
        context: &mut CommandContext,
        user: &mut User,
        kind: PostingKind,
        amount: Money,
        reference: PostingRef,
        at: Timestamp,
    ) -> Step<()> {
        // Checked before anything is written: a refused posting leaves wallet and accounts as they were.
        let after = self.accounts(user).after(kind, amount)?;
        if amount == Money::ZERO {
            return Ok(());
        }
        let ledger_seq = user.ledger_seq.checked_add(1).ok_or_else(overflow)?;
        let posting_seq = self.meta.posting_seq.checked_add(1).ok_or_else(overflow)?;
        user.balance = after.balance;
        user.held = after.held;
        self.meta.psp_clearing = after.psp_clearing;
        self.meta.revenue = after.revenue;
        if self.receivable != after.receivable {
            self.receivable = after.receivable;
            self.receivable_changed = true;
        }
        user.ledger_seq = ledger_seq;
        self.meta.posting_seq = posting_seq;
        let (debit, credit) = kind.accounts(&user.user_id);
        let posting = Posting {
            seq: self.meta.posting_seq,
            entry_id: context.ids.next_id(),
            user_id: user.user_id.clone(),
            user_seq: user.ledger_seq,
            kind,
            debit,
            credit,
            amount,
            reference,
            at,
            balance_after: user.balance,
            held_after: user.held,
            prev_hash: self.meta.posting_head,
        };
        let bytes = encode(&posting)?;
        self.meta.posting_head = Sha256::digest(&bytes).into();
        self.postings
            .write()?
            .insert(posting.seq, bytes.as_slice())?;
        user_rows::put_posting(
            self.user_rows.write()?,
            &user.user_id,
            user.ledger_seq,
            posting.seq,
        )?;
        Ok(())
    }
}

/// The rejection of an amount, or a sum of amounts, outside what `apply` accepts.
pub(super) fn overflow() -> Rejection {
    Rejection::invalid("amount out of range")
}

/// A wallet and the shard's system accounts, as one posting leaves them.
#[derive(Clone, Copy, Debug)]
struct Accounts {
    balance: Money,
    held: Money,
    psp_clearing: i64,
    revenue: i64,
    receivable: i64,
}

impl Accounts {
    /// The accounts after a posting of `amount` of `kind`: computed exactly in `i128`, then narrowed with
    /// a check. A negative amount, a sum outside `i64`, or a wallet left with `held < 0` or
    /// `held > balance` is refused (a zero amount moves nothing and is allowed).
    fn after(self, kind: PostingKind, amount: Money) -> Result<Accounts, Rejection> {
        if amount.is_negative() {
            return Err(Rejection::invalid("postings move positive amounts"));
        }
        let (balance_delta, held_delta) = kind.wallet_delta(amount);
        let system = kind.system_delta(amount);
        let moved = |from: i64, delta: i128| {
            i128::from(from)
                .checked_add(delta)
                .and_then(|sum| i64::try_from(sum).ok())
                .ok_or_else(overflow)
        };
        let after = Accounts {
            balance: Money::from_minor(moved(self.balance.minor(), balance_delta)?),
            held: Money::from_minor(moved(self.held.minor(), held_delta)?),
            psp_clearing: moved(self.psp_clearing, system.psp_clearing)?,
            revenue: moved(self.revenue, system.revenue)?,
            receivable: moved(self.receivable, system.receivable)?,
        };
        if after.held.is_negative() || after.held > after.balance {
            return Err(Rejection::invalid(
                "the posting would leave the wallet's held outside 0..=balance",
            ));
        }
        Ok(after)
    }
}

/// Decodes a posting row (used by queries and the audit too).
pub(crate) fn decode_posting(bytes: &[u8]) -> Result<Posting, StoreError> {
    decode(bytes)
}
