//! Commands for the state layer's unit tests: an item, a user, a credit and a purchase, each with the
//! fields a test rarely varies fixed to one plausible value.

use crate::domain::command::{self, Command, LineRequest};
use crate::domain::{ItemKind, ItemSpec, Money, Timestamp};

/// Puts item `item_id` (its name the same) of `kind` on sale at 1.00, refundable for 14 days.
pub(crate) fn put_item(item_id: &str, kind: ItemKind) -> Command {
    Command::PutItem(command::PutItem {
        spec: ItemSpec {
            item_id: item_id.into(),
            name: item_id.into(),
            kind,
            price: Money::from_minor(100),
            active: true,
            refund_window_days: 14,
        },
        version: None,
    })
}

/// Creates user `user_id` without a display name.
pub(crate) fn create_user(user_id: &str) -> Command {
    Command::CreateUser(command::CreateUser {
        user_id: user_id.into(),
        display_name: None,
    })
}

/// Credits `user_id` with 100.00 under the external reference `ref-{user_id}`.
pub(crate) fn credit(user_id: &str) -> Command {
    Command::Credit(command::Credit {
        user_id: user_id.into(),
        amount: Money::from_minor(10_000),
        external_ref: format!("ref-{user_id}"),
        source: None,
        ref_accepted: true,
    })
}

/// An order by `user_id` of `quantity` of `item_id`, completed at once when `complete`, else left
/// pending until 2033.
pub(crate) fn order(user_id: &str, item_id: &str, quantity: u32, complete: bool) -> Command {
    Command::CreateOrder(command::CreateOrder {
        user_id: user_id.into(),
        lines: vec![LineRequest {
            item_id: item_id.into(),
            quantity,
        }],
        expected_total: None,
        complete,
        expires_at: Timestamp::from_unix_seconds(2_000_000_000),
        max_pending_orders: 10,
    })
}
