//! Limits as the admin manages them: the shop-wide limits decided on their home shard (which numbers
//! their generations) and copied to every other shard, as webhooks are, so that each user's shard
//! decides locally; a user's overrides, on the user's shard; and the reads of both.

use super::coordinator::system_envelope;
use super::{Applied, Consistency, EngineError, Missing, Node};
use crate::domain::limits::Usage;
use crate::domain::{Command, LimitChanges, LimitSet, Reply, ShopLimits, Timestamp, command};
use crate::state::query;

/// The system key whose shard is the home of the shop-wide limits.
const HOME_KEY: &str = "limits";

/// A user's limits as its shard has them at one moment.
#[derive(Clone, Debug)]
pub struct UserLimitsView {
    /// What the user has set (`Default`: the shop's value).
    pub overrides: LimitSet,
    /// The shop-wide limits as the user's shard has them.
    pub shop: LimitSet,
    pub usage: Usage,
}

impl Node {
    /// The shard that numbers the shop-wide limits' generations.
    pub fn limits_home(&self) -> u32 {
        self.shard_of_system_key(HOME_KEY)
    }

    /// Changes the shop-wide limits on their home shard, then copies the home's whole set (at the
    /// generation it decided) to every other shard. A change that stops midway leaves some shards
    /// behind: repeating it, or the sweeper's repair, brings them up.
    pub async fn put_shop_limits(&self, changes: LimitChanges) -> Result<Applied, EngineError> {
        let home = self.limits_home();
        let decide = Command::PutShopLimits(command::PutShopLimits {
            changes,
            generation: None,
        });
        let decided = self.propose(home, system_envelope(decide)).await?;
        let shop = match &decided.outcome {
            Ok(Reply::ShopLimits(shop)) => shop.clone(),
            Ok(other) => {
                return Err(EngineError::Internal(format!("unexpected reply {other:?}")));
            }
            Err(_) => return Ok(decided),
        };
        for shard in (0..self.shard_count()).filter(|&s| s != home) {
            self.propose(shard, system_envelope(copy_of(&shop))).await?;
        }
        Ok(decided)
    }

    /// Brings every shard's copy of the shop-wide limits up to the home's generation, if this node
    /// leads the home shard. Returns how many copies it wrote. Reads this node's replicas: a stale read
    /// only costs a copy that changes nothing.
    pub async fn repair_shop_limits(&self) -> Result<usize, EngineError> {
        let home = self.limits_home();
        if !self.cluster().is_leader(home) {
            return Ok(0);
        }
        let Some(shop) = self
            .read(Consistency::Local, home, query::shop_limits)
            .await?
        else {
            return Ok(0);
        };
        let mut repaired = 0;
        for shard in (0..self.shard_count()).filter(|&s| s != home) {
            let copy = self
                .read(Consistency::Local, shard, query::shop_limits)
                .await?;
            if copy.is_some_and(|c| c.generation >= shop.generation) {
                continue;
            }
            self.propose(shard, system_envelope(copy_of(&shop))).await?;
            repaired += 1;
        }
        Ok(repaired)
    }

    /// The shop-wide limits as their home shard has them (all `Default`: never set).
    pub async fn shop_limits(&self, consistency: Consistency) -> Result<LimitSet, EngineError> {
        let shop = self
            .read(consistency, self.limits_home(), query::shop_limits)
            .await?;
        Ok(shop.map(|s| s.limits).unwrap_or_default())
    }

    /// A user's overrides, the shop-wide limits its shard holds, and its usage as of `now`.
    pub async fn user_limits(
        &self,
        consistency: Consistency,
        user_id: &str,
        now: Timestamp,
    ) -> Result<UserLimitsView, EngineError> {
        let id = user_id.to_owned();
        let found = self
            .read(
                consistency,
                self.shard_of_user(user_id),
                move |txn| match query::user(txn, &id)? {
                    Some(_) => query::user_limits(txn, &id, now).map(Some),
                    None => Ok(None),
                },
            )
            .await?;
        let (overrides, shop, usage) = found.ok_or(EngineError::NotFound(Missing::User))?;
        Ok(UserLimitsView {
            overrides,
            shop,
            usage,
        })
    }
}

/// The command that makes another shard's copy of the shop-wide limits what the home shard has.
fn copy_of(shop: &ShopLimits) -> Command {
    Command::PutShopLimits(command::PutShopLimits {
        changes: shop.limits.as_changes(),
        generation: Some(shop.generation),
    })
}
