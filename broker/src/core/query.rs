//! Reading a parent's bubbles: describe and paged listing.

use super::commands::ListPage;
use super::lifecycle::State;
use super::Broker;
use crate::error::{invalid, BrokerError};

/// Most bubbles in one page of a listing (and the default page size).
pub const MAX_PAGE: usize = 1000;

impl Broker {
    /// Describes one of `parent`'s bubbles.
    pub fn describe(
        &self,
        parent: &str,
        id: &str,
    ) -> Result<crate::store::registry::BubbleRecord, BrokerError> {
        self.owned(parent, id)
    }

    /// One page of `parent`'s bubbles, oldest first. `after` is the token
    /// of the previous page (empty: from the start): the sort key of the
    /// last bubble it held, so a page never repeats or skips a bubble that
    /// existed when the listing started.
    pub fn list(
        &self,
        parent: &str,
        include_deleted: bool,
        page_size: usize,
        after: &str,
    ) -> Result<ListPage, BrokerError> {
        self.page(Some(parent), include_deleted, page_size, after)
    }

    /// Like [`Broker::list`], over every parent's bubbles and the warm
    /// pools' (the operator's view); only for a configured admin.
    pub fn list_all(
        &self,
        admin: &str,
        include_deleted: bool,
        page_size: usize,
        after: &str,
    ) -> Result<ListPage, BrokerError> {
        self.require_admin(admin)?;
        self.page(None, include_deleted, page_size, after)
    }

    /// One page of the bubbles of `owner` (`None`: everyone's).
    fn page(
        &self,
        owner: Option<&str>,
        include_deleted: bool,
        page_size: usize,
        after: &str,
    ) -> Result<ListPage, BrokerError> {
        let size = match page_size {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let cursor = if after.is_empty() {
            None
        } else {
            let (ms, id) = after
                .split_once('.')
                .and_then(|(ms, id)| Some((ms.parse::<u64>().ok()?, id.to_string())))
                .ok_or_else(|| invalid("page_token", "not a token from a previous page"))?;
            Some((ms, id))
        };
        let mut v: Vec<_> = self.table.with(|t| {
            t.records()
                .filter(|r| owner.is_none_or(|o| r.owner == o))
                .filter(|r| include_deleted || r.state != State::Deleted)
                .filter(|r| {
                    cursor
                        .as_ref()
                        .is_none_or(|(ms, id)| (r.created_at_ms, &r.id) > (*ms, id))
                })
                .cloned()
                .collect()
        });
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        let next = if v.len() > size {
            v.truncate(size);
            v.last()
                .map(|r| format!("{}.{}", r.created_at_ms, r.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListPage { bubbles: v, next })
    }
}
