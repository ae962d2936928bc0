//! What a replica says of its own tenures as primary when a sync session
//! opens, and when it stops being a former primary: decisions only.
//!
//! A node that served as primary and then rejoins as a replica may hold
//! versions the new primary never had; the primary decides which of them
//! are genuine conflicts (kept aside) only if the replica says it served
//! (`PeerState`), and at which epoch last (which part of the primary's
//! takeover record counts). The replica says so until a primary has
//! reconciled it completely (`CaughtUp` with none of its kept-aside
//! versions still on their way), and from then on is a plain secondary.
//!
//! The receiver reads the mark in the state directory
//! ([`super::takeover::is_former_primary`], [`super::takeover::served_epoch`])
//! and the tenure begun in this process, and clears the mark; the data-path
//! simulator runs the same decisions over its model of the mark.

use crate::wire::sync::SyncMsg;

/// A replica's own past as a primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnTenure {
    /// The former-primary mark is in the state directory (durable).
    pub marked: bool,
    /// The epoch of the tenure the mark records, if it records one (a mark
    /// of an earlier release records only a time).
    pub marked_epoch: Option<u64>,
    /// The epoch of a tenure begun in this process (0: none). Its mark may
    /// be missing: a full or failing state directory, the node serving on
    /// with an alarm.
    pub served_here: u64,
}

impl OwnTenure {
    /// Whether the node served as primary since a primary last reconciled
    /// it.
    pub fn former_primary(&self) -> bool {
        self.marked || self.served_here != 0
    }

    /// The epoch of the last tenure it served: the mark's or this
    /// process's, whichever is higher; `None` for a plain secondary or
    /// when neither says.
    pub fn served_epoch(&self) -> Option<u64> {
        if !self.former_primary() {
            return None;
        }
        self.marked_epoch
            .max(Some(self.served_here).filter(|&e| e != 0))
    }

    /// The `PeerState` the replica answers a session's `Start` with.
    pub fn peer_state(&self) -> SyncMsg {
        SyncMsg::PeerState {
            former_primary: self.former_primary(),
            served_epoch: self.served_epoch(),
        }
    }

    /// At `CaughtUp` (the primary found nothing left to send or keep
    /// aside): whether this former primary is reconciled now, its mark and
    /// this process's tenure to be forgotten. Not while it is `handing_over`
    /// a version it kept aside (still to send, or sent and unacknowledged).
    pub fn reconciled(&self, handing_over: bool) -> bool {
        self.former_primary() && !handing_over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(t: OwnTenure) -> (bool, Option<u64>) {
        match t.peer_state() {
            SyncMsg::PeerState {
                former_primary,
                served_epoch,
            } => (former_primary, served_epoch),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_that_never_served_is_a_plain_secondary() {
        let t = OwnTenure::default();
        assert_eq!(said(t), (false, None));
        assert!(!t.reconciled(false));
    }

    #[test]
    fn the_mark_or_this_processs_tenure_makes_a_former_primary_at_its_latest_epoch() {
        let marked = OwnTenure {
            marked: true,
            marked_epoch: Some(5),
            served_here: 0,
        };
        assert_eq!(said(marked), (true, Some(5)));
        // A tenure begun here whose mark could not be written.
        let unmarked = OwnTenure {
            served_here: 7,
            ..OwnTenure::default()
        };
        assert_eq!(said(unmarked), (true, Some(7)));
        // Both: the later tenure.
        let both = OwnTenure {
            served_here: 7,
            ..marked
        };
        assert_eq!(said(both), (true, Some(7)));
        // A mark of an earlier release says no epoch.
        let old = OwnTenure {
            marked: true,
            ..OwnTenure::default()
        };
        assert_eq!(said(old), (true, None));
        // An epoch without a mark (it cannot be read otherwise) says nothing.
        let stray = OwnTenure {
            marked_epoch: Some(3),
            ..OwnTenure::default()
        };
        assert_eq!(said(stray), (false, None));
    }

    #[test]
    fn reconciled_only_once_no_kept_aside_version_is_on_its_way() {
        let t = OwnTenure {
            marked: true,
            marked_epoch: Some(2),
            served_here: 0,
        };
        assert!(!t.reconciled(true));
        assert!(t.reconciled(false));
    }
}
