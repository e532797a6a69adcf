//! The catalog: `PutItem` on the home shard (which decides the version) and on every other shard (which
//! copies newer versions), and the price check.

use redb::ReadableTableMetadata;

use super::ledger::overflow;
use super::{Applier, CommandContext, Step};
use crate::domain::command;
use crate::domain::model::MAX_CATALOG_ITEMS;
use crate::domain::money::MAX_WALLET_BALANCE;
use crate::domain::{Item, Money, Rejection, Reply};
use crate::state::tables::{encode, get};

impl Applier<'_> {
    pub(super) fn put_item(
        &mut self,
        context: &mut CommandContext,
        command: &command::PutItem,
    ) -> Step<Reply> {
        let (spec, version) = (&command.spec, command.version);
        check_price(spec.price)?;
        let existing: Option<Item> = get(self.items.read()?, spec.item_id.as_str())?;
        let new_version = match (version, &existing) {
            // The catalog's home shard decides the version: +1 on a change, unchanged otherwise.
            (None, Some(item)) if item.spec == *spec => return Ok(Reply::Item(item.clone())),
            (None, Some(item)) if item.spec.kind != spec.kind => {
                return Err(Rejection::ItemKindFixed {
                    item_id: spec.item_id.clone(),
                    kind: item.spec.kind.as_str().to_owned(),
                }
                .into());
            }
            (None, Some(item)) => item.version + 1,
            (None, None) => {
                if self.items.read()?.len()? >= MAX_CATALOG_ITEMS {
                    return Err(Rejection::CatalogFull {
                        limit: MAX_CATALOG_ITEMS,
                    }
                    .into());
                }
                1
            }
            // Other shards copy the home shard's item when it is newer than theirs.
            (Some(_), Some(item)) if item.version >= version.unwrap_or(0) => {
                return Ok(Reply::Item(item.clone()));
            }
            (Some(v), _) => v,
        };
        let item = Item {
            spec: spec.clone(),
            version: new_version,
            updated_at: context.now,
        };
        let bytes = encode(&item)?;
        self.items
            .write()?
            .insert(spec.item_id.as_str(), bytes.as_slice())?;
        Ok(Reply::Item(item))
    }
}

/// A catalog price: zero (a free item) or positive, and no more than a wallet may hold.
fn check_price(price: Money) -> Result<(), Rejection> {
    if price.is_negative() {
        return Err(Rejection::invalid("price must not be negative"));
    }
    if price > MAX_WALLET_BALANCE {
        return Err(overflow());
    }
    Ok(())
}
