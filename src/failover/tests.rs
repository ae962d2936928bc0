//! Scenario tests of the core, on the simulator and directly.

use std::time::{Duration, Instant};

use super::sim::{Fault, FaultKind, Plan, Sim};
use super::*;

fn cfg(name: &str, peer: &str, priority: u8) -> CoreConfig {
    CoreConfig {
        node_name: name.into(),
        peer_name: peer.into(),
        priority,
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_lost_threshold: 5,
        startup_wait: Duration::from_millis(1000),
        recovery: RecoveryPolicy::BecomeSecondary,
        tie_break: TieBreak::LowerName,
        prepare_handover: None,
        quorum: QuorumRule::None,
    }
}

fn plan(p0: u8, p1: u8, faults: Vec<Fault>) -> Plan {
    Plan {
        seed: 1,
        configs: [cfg("mx1", "mx2", p0), cfg("mx2", "mx1", p1)],
        start_offset_ms: 0,
        delay_ms: (1, 5),
        persist_ms: 3,
        fill_ms: 0,
        faults,
    }
}

/// The epoch record among `acts` that asks to be written, if any.
fn persisted(acts: &[Action]) -> Option<EpochRecord> {
    acts.iter().find_map(|a| match a {
        Action::PersistEpoch(r) => Some(*r),
        _ => None,
    })
}

fn drain(core: &mut Core) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

#[test]
fn higher_priority_wins_start_up_election() {
    let out = Sim::new(plan(10, 200, vec![])).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Secondary), Some(Role::Primary)]
    );
    assert_eq!(out.promotions, 1);
}

#[test]
fn equal_priority_uses_tie_break() {
    let out = Sim::new(plan(100, 100, vec![])).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Primary), Some(Role::Secondary)]
    );
    let mut p = plan(100, 100, vec![]);
    for c in p.configs.iter_mut() {
        c.tie_break = TieBreak::HigherName;
    }
    let out = Sim::new(p).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Secondary), Some(Role::Primary)]
    );
}

#[test]
fn crashed_primary_rejoins_as_secondary_and_pushes_its_queue() {
    let crash = Fault {
        at_ms: 3000,
        kind: FaultKind::Crash {
            node: 0,
            down_ms: 2000,
        },
    };
    let out = Sim::new(plan(200, 100, vec![crash])).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Secondary), Some(Role::Primary)]
    );
    assert_eq!(out.queue_pushes, 1, "former primary must push its queue");
    assert!(out.final_epochs[1] > 1, "takeover must take a new epoch");
}

#[test]
fn restore_role_takes_primary_back_after_push_and_catch_up() {
    let crash = Fault {
        at_ms: 3000,
        kind: FaultKind::Crash {
            node: 0,
            down_ms: 2000,
        },
    };
    let mut p = plan(200, 100, vec![crash]);
    p.configs[0].recovery = RecoveryPolicy::RestoreRole;
    let out = Sim::new(p).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Primary), Some(Role::Secondary)]
    );
    assert_eq!(
        out.queue_pushes, 2,
        "old primary pushes, then the handing-over node pushes"
    );
    assert_eq!(out.promotions, 3);
}

#[test]
fn recovery_policy_off_keeps_the_node_out() {
    let crash = Fault {
        at_ms: 3000,
        kind: FaultKind::Crash {
            node: 0,
            down_ms: 2000,
        },
    };
    let mut p = plan(200, 100, vec![crash]);
    p.configs[0].recovery = RecoveryPolicy::Off;
    let out = Sim::new(p).run().unwrap();
    assert_eq!(out.final_roles, [Some(Role::Off), Some(Role::Primary)]);
    assert_eq!(out.queue_pushes, 0);
}

#[test]
fn join_after_recovery_policy_off_rejoins_as_secondary_and_pushes_the_queue() {
    let crash = Fault {
        at_ms: 3000,
        kind: FaultKind::Crash {
            node: 0,
            down_ms: 2000,
        },
    };
    let join = Fault {
        at_ms: 9000,
        kind: FaultKind::Join { node: 0 },
    };
    let mut p = plan(200, 100, vec![crash, join]);
    p.configs[0].recovery = RecoveryPolicy::Off;
    let out = Sim::new(p).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Secondary), Some(Role::Primary)],
        "the operator's join serves the policy: the former primary rejoins"
    );
    assert_eq!(
        out.queue_pushes, 1,
        "the former primary's queue goes to the new primary on join"
    );
}

#[test]
fn a_prepared_switchover_hands_over_once_prepared() {
    for node in 0..2 {
        let sw = Fault {
            at_ms: 3000,
            kind: FaultKind::Switchover { node },
        };
        let mut p = plan(200, 100, vec![sw]);
        for c in p.configs.iter_mut() {
            c.prepare_handover = Some(Duration::from_secs(2));
        }
        let out = Sim::new(p).run().unwrap();
        assert_eq!(
            out.final_roles,
            [Some(Role::Secondary), Some(Role::Primary)],
            "switchover requested on node {node}"
        );
        assert_eq!(out.switchovers_abandoned, 0);
    }
}

#[test]
fn a_switchover_whose_preparation_overruns_is_abandoned_and_the_primary_serves_on() {
    let sw = Fault {
        at_ms: 3000,
        kind: FaultKind::Switchover { node: 0 },
    };
    let mut p = plan(200, 100, vec![sw]);
    for c in p.configs.iter_mut() {
        // Shorter than the simulated preparation.
        c.prepare_handover = Some(Duration::from_millis(1));
    }
    let out = Sim::new(p).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Primary), Some(Role::Secondary)]
    );
    assert_eq!(out.switchovers_abandoned, 1);
    assert_eq!(out.promotions, 1, "nobody promoted");
}

#[test]
fn a_primary_preparing_its_handover_keeps_serving_and_abandons_if_the_peer_is_lost() {
    let t0 = Instant::now();
    // Primary, its secondary heard at t1.
    let mut c = primary_beside_secondary(t0, 0);
    let t1 = t0 + Duration::from_secs(2);
    c.request_switchover(t1).unwrap();
    let acts = drain(&mut c);
    assert!(
        acts.iter().any(|a| matches!(a, Action::PrepareHandover)),
        "{acts:?}"
    );
    assert_eq!(c.role(), Role::Primary, "still serving while preparing");
    assert!(c.status().handover_preparing);
    // The peer goes silent: the switchover is off, the node serves on.
    c.handle_timeout(t1 + Duration::from_secs(5));
    let acts = drain(&mut c);
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::ResumeService { .. })),
        "{acts:?}"
    );
    assert_eq!(c.role(), Role::Primary);
    assert!(!c.status().handover_preparing);
    // A late "prepared" changes nothing.
    c.handle_event(t1 + Duration::from_secs(6), Event::HandoverPrepared);
    assert_eq!(c.role(), Role::Primary);
}

#[test]
fn a_stale_heartbeat_from_before_the_peers_promotion_is_ignored() {
    // mx1 (higher priority) demoted after a split brain to mx2 at epoch 2;
    // a heartbeat mx2 sent as secondary at epoch 1, queued in the cut link,
    // arrives after the heal. Taken as current, mx1 would win an election
    // against a primary.
    let t0 = Instant::now();
    let mut c = Core::new(
        cfg("mx1", "mx2", 200),
        EpochRecord {
            epoch: 1,
            held_primary: None,
        },
        t0,
    );
    let hb = |role, epoch, seq| {
        Event::Heartbeat(Heartbeat {
            node: "mx2".into(),
            role,
            epoch,
            priority: 100,
            seq,
            flags: 0,
        })
    };
    c.handle_event(t0, hb(Role::Primary, 2, 10));
    assert_eq!(c.role(), Role::Secondary);
    drain(&mut c);
    c.handle_event(t0 + Duration::from_millis(10), hb(Role::Secondary, 1, 3));
    assert_eq!(
        c.role(),
        Role::Secondary,
        "the stale heartbeat changed nothing"
    );
    assert!(!drain(&mut c).iter().any(|a| matches!(
        a,
        Action::Become {
            role: Role::Promoting,
            ..
        }
    )));
    assert_eq!(c.status().peer_role, Some(Role::Primary));
}

#[test]
fn split_brain_after_partition_resolves_to_higher_epoch() {
    let part = Fault {
        at_ms: 3000,
        kind: FaultKind::Partition { for_ms: 3000 },
    };
    let out = Sim::new(plan(200, 100, vec![part])).run().unwrap();
    // Node 1 promoted during the partition (newer epoch) and stays primary.
    assert_eq!(
        out.final_roles,
        [Some(Role::Secondary), Some(Role::Primary)]
    );
    assert!(out.split_brain_alarms >= 1);
    assert_eq!(out.queue_pushes, 1, "the demoted primary pushes its queue");
}

#[test]
fn manual_switchover_from_either_side() {
    for node in 0..2 {
        let sw = Fault {
            at_ms: 3000,
            kind: FaultKind::Switchover { node },
        };
        let out = Sim::new(plan(200, 100, vec![sw])).run().unwrap();
        assert_eq!(
            out.final_roles,
            [Some(Role::Secondary), Some(Role::Primary)],
            "switchover requested on node {node}"
        );
    }
}

#[test]
fn failed_self_check_steps_out_and_peer_takes_over() {
    let f = Fault {
        at_ms: 3000,
        kind: FaultKind::SelfFail {
            node: 0,
            for_ms: 1500,
        },
    };
    let out = Sim::new(plan(200, 100, vec![f])).run().unwrap();
    assert_eq!(
        out.final_roles,
        [Some(Role::Secondary), Some(Role::Primary)]
    );
}

#[test]
fn promotion_waits_for_durable_epoch() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    drain(&mut core);
    let later = t0 + Duration::from_millis(1000);
    core.handle_timeout(later);
    let acts = drain(&mut core);
    assert_eq!(core.role(), Role::Promoting);
    let persist = persisted(&acts).expect("promotion must persist the epoch");
    assert!(!acts.iter().any(|a| matches!(
        a,
        Action::Become {
            role: Role::Primary,
            ..
        }
    )));
    // mx1 < mx2, so mx1 owns the odd epochs.
    assert_eq!(persist.epoch, 1);
    assert_eq!(persist.held_primary, Some(1));
    core.handle_event(later, Event::Persisted(persist));
    assert_eq!(core.role(), Role::Primary);
}

#[test]
fn a_promotion_record_landing_after_the_promotion_ended_never_lets_the_epoch_go_back() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    drain(&mut core);
    let t1 = t0 + Duration::from_millis(1000);
    core.handle_timeout(t1);
    let promotion = persisted(&drain(&mut core)).expect("promotion persists its epoch");
    assert_eq!(core.role(), Role::Promoting);
    // The check fails while the record is being written: the promotion ends.
    core.handle_event(t1, Event::SelfCheck(Err("disk gone".into())));
    assert_eq!(core.role(), Role::Failed);
    drain(&mut core);
    // The record lands after all: the epoch is spent, but the node never
    // served at it and says so durably.
    core.handle_event(t1, Event::Persisted(promotion));
    assert_eq!(core.role(), Role::Failed);
    assert_eq!(core.epoch(), promotion.epoch);
    let fix = persisted(&drain(&mut core)).expect("the record is corrected");
    assert_eq!(fix.epoch, promotion.epoch);
    assert_eq!(fix.held_primary, None);
    // Every later record keeps at least that epoch.
    core.handle_event(t1, Event::Persisted(fix));
    core.handle_event(t1, Event::SelfCheck(Ok(())));
    let hb = Heartbeat {
        node: "mx2".into(),
        role: Role::Primary,
        epoch: 2,
        seq: 1,
        priority: 100,
        flags: 0,
    };
    core.handle_event(t1, Event::Heartbeat(hb));
    assert_eq!(core.role(), Role::Secondary);
    for a in drain(&mut core) {
        if let Action::PersistEpoch(r) = a {
            assert!(r.epoch >= promotion.epoch, "epoch went back: {r:?}");
        }
    }
}

#[test]
fn persist_failure_fails_the_node() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    core.handle_timeout(t0 + Duration::from_secs(1));
    drain(&mut core);
    core.handle_event(t0, Event::PersistFailed("EIO on /var/lib/hasync".into()));
    assert_eq!(core.role(), Role::Failed);
    let acts = drain(&mut core);
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Alarm(Alarm::PersistFailed(_)))));
}

#[test]
fn a_full_state_directory_keeps_the_node_failed_at_its_durable_epoch_until_a_write_succeeds() {
    let t0 = Instant::now();
    let durable = EpochRecord {
        epoch: 1,
        held_primary: None,
    };
    let mut core = Core::new(cfg("mx1", "mx2", 100), durable, t0);
    drain(&mut core);
    let mut t = t0 + Duration::from_secs(1);
    core.handle_timeout(t);
    assert_eq!(core.role(), Role::Promoting);
    let acts = drain(&mut core);
    let wanted = persisted(&acts).unwrap();
    assert_eq!(wanted.epoch, 3);
    // Not durable: never advertised while promoting.
    for a in &acts {
        if let Action::SendHeartbeat(hb) = a {
            assert_eq!(hb.epoch, 1, "{a:?}");
        }
    }
    core.handle_event(t, Event::PersistFailed("no space left on device".into()));
    assert_eq!((core.role(), core.epoch()), (Role::Failed, 1));
    let alarms = |acts: &[Action]| {
        acts.iter()
            .filter(|a| matches!(a, Action::Alarm(Alarm::PersistFailed(_))))
            .count()
    };
    assert_eq!(alarms(&drain(&mut core)), 1);
    // Passing self-checks retry the write; failures keep it failed, at its
    // durable epoch, with one alarm for the whole episode.
    for _ in 0..50 {
        t += Duration::from_millis(100);
        core.handle_event(t, Event::SelfCheck(Ok(())));
        core.handle_timeout(t);
        let acts = drain(&mut core);
        let probe = persisted(&acts);
        assert_eq!(probe, Some(durable), "the probe writes the durable record");
        assert_eq!(alarms(&acts), 0);
        for a in &acts {
            if let Action::SendHeartbeat(hb) = a {
                assert_eq!((hb.role, hb.epoch), (Role::Failed, 1));
            }
        }
        core.handle_event(t, Event::PersistFailed("no space left on device".into()));
        assert_eq!((core.role(), core.epoch()), (Role::Failed, 1));
    }
    // Space is back: the probe lands, the node negotiates again and
    // promotes to the same epoch it tried first.
    core.handle_event(t, Event::SelfCheck(Ok(())));
    drain(&mut core);
    core.handle_event(t, Event::Persisted(durable));
    assert_eq!(core.role(), Role::Negotiating);
    t += Duration::from_secs(2);
    core.handle_timeout(t);
    assert_eq!(core.role(), Role::Promoting);
    let acts = drain(&mut core);
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::PersistEpoch(r) if r.epoch == 3)));
}

#[test]
fn epochs_are_partitioned_by_node() {
    let t0 = Instant::now();
    let a = Core::new(cfg("mx1", "mx2", 1), EpochRecord::default(), t0);
    let b = Core::new(cfg("mx2", "mx1", 1), EpochRecord::default(), t0);
    for after in 0..50 {
        let ea = a.next_owned_epoch(after);
        let eb = b.next_owned_epoch(after);
        assert!(ea > after && eb > after && ea != eb);
        assert!(ea <= after + 2 && eb <= after + 2);
    }
}

#[test]
fn switchover_without_live_peer_is_refused() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    assert_eq!(
        core.request_switchover(t0),
        Err(CommandRefused::WrongRole(Role::Negotiating))
    );
}

#[test]
fn heartbeat_from_unexpected_node_is_ignored() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    drain(&mut core);
    core.handle_event(
        t0,
        Event::Heartbeat(Heartbeat {
            node: "intruder".into(),
            role: Role::Primary,
            epoch: 99,
            seq: 1,
            priority: 255,
            flags: 0,
        }),
    );
    assert_eq!(core.role(), Role::Negotiating);
    assert!(drain(&mut core)
        .iter()
        .any(|a| matches!(a, Action::Alarm(Alarm::UnexpectedPeer { .. }))));
}

#[test]
fn a_primary_that_hears_a_higher_epoch_from_its_secondary_takes_one_above_it_once_durable() {
    // mx2 served at 6 in a split brain, then joined mx1 (primary at 5):
    // the replica's fence is 6, so mx1 must serve above it.
    let t0 = Instant::now();
    let mut c = Core::new(cfg("mx1", "mx2", 200), EpochRecord::default(), t0);
    drain(&mut c);
    let t = t0 + Duration::from_millis(1000);
    c.handle_timeout(t);
    let rec = persisted(&drain(&mut c)).unwrap();
    c.handle_event(t, Event::Persisted(rec));
    assert_eq!((c.role(), c.epoch()), (Role::Primary, 1));
    drain(&mut c);
    let hb = Event::Heartbeat(Heartbeat {
        node: "mx2".into(),
        role: Role::Secondary,
        epoch: 6,
        priority: 100,
        seq: 1,
        flags: 0,
    });
    c.handle_event(t, hb.clone());
    let acts = drain(&mut c);
    let raise = persisted(&acts).expect("the primary makes a higher epoch durable");
    // mx1 owns the odd epochs: 7, serving at it once durable.
    assert_eq!(
        raise,
        EpochRecord {
            epoch: 7,
            held_primary: Some(7)
        }
    );
    assert_eq!(c.epoch(), 1, "not advertised before it is durable");
    assert!(!acts.iter().any(|a| matches!(
        a,
        Action::SendHeartbeat(h) if h.epoch == 7
    )));
    // The same heartbeat again asks for nothing more.
    c.handle_event(t, hb);
    assert!(!drain(&mut c)
        .iter()
        .any(|a| matches!(a, Action::PersistEpoch(_))));
    c.handle_event(t, Event::Persisted(raise));
    assert_eq!((c.role(), c.epoch()), (Role::Primary, 7));
    assert!(drain(&mut c)
        .iter()
        .any(|a| matches!(a, Action::SendHeartbeat(h) if h.epoch == 7 && h.role == Role::Primary)));
}

/// A heartbeat from mx2.
fn hb_from_mx2(role: Role, epoch: u64, seq: u64, flags: u8) -> Event {
    Event::Heartbeat(Heartbeat {
        node: "mx2".into(),
        role,
        epoch,
        priority: 100,
        seq,
        flags,
    })
}

/// mx1 (priority 200), secondary of the primary mx2 at epoch 2, its first
/// fill under way.
fn filling_secondary(t0: Instant) -> Core {
    let mut c = Core::new(
        cfg("mx1", "mx2", 200),
        EpochRecord {
            epoch: 2,
            held_primary: None,
        },
        t0,
    );
    c.handle_event(t0, Event::Replica(ReplicaFill::Filling));
    c.handle_event(t0, hb_from_mx2(Role::Primary, 2, 1, 0));
    assert_eq!(c.role(), Role::Secondary);
    c
}

fn promotes(acts: &[Action]) -> bool {
    acts.iter().any(|a| {
        matches!(
            a,
            Action::Become {
                role: Role::Promoting,
                ..
            }
        )
    })
}

#[test]
fn an_incomplete_replica_does_not_promote_when_its_primary_is_lost_until_accepted() {
    let t0 = Instant::now();
    // mx1 (higher priority, so it would win any election) is the
    // secondary of mx2, and its first fill is under way.
    let mut c = filling_secondary(t0);
    assert_eq!(c.role(), Role::Secondary);
    let acts = drain(&mut c);
    let flags = acts.iter().rev().find_map(|a| match a {
        Action::SendHeartbeat(hb) => Some(hb.flags),
        _ => None,
    });
    assert_eq!(
        flags.map(|f| f & FLAG_REPLICA_INCOMPLETE),
        Some(FLAG_REPLICA_INCOMPLETE),
        "its heartbeats say so"
    );
    // The primary goes silent: no promotion, one alarm.
    let lost = t0 + Duration::from_secs(2);
    c.handle_timeout(lost);
    let acts = drain(&mut c);
    assert_eq!(c.role(), Role::Secondary);
    assert!(!promotes(&acts));
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::Alarm(Alarm::ReplicaIncomplete)))
            .count(),
        1,
        "{acts:?}"
    );
    // Much later still nothing.
    c.handle_timeout(lost + Duration::from_secs(60));
    assert!(!promotes(&drain(&mut c)));
    assert_eq!(c.status().replica, ReplicaFill::Filling);
    // The operator accepts the replica as it is: it promotes now.
    let t2 = lost + Duration::from_secs(61);
    c.handle_event(t2, Event::Replica(ReplicaFill::Complete));
    let acts = drain(&mut c);
    assert!(promotes(&acts), "{acts:?}");
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Become {
            reason: Reason::ReplicaAccepted,
            ..
        }
    )));
}

#[test]
fn an_incomplete_replica_waits_for_a_restarted_peer_which_promotes_on_hearing_it() {
    let t0 = Instant::now();
    // The incomplete secondary mx1 hears its peer restarting.
    let mut sec = filling_secondary(t0);
    drain(&mut sec);
    let t1 = t0 + Duration::from_secs(2);
    sec.handle_timeout(t1);
    sec.handle_event(t1, hb_from_mx2(Role::Negotiating, 2, 1, 0));
    assert!(
        !promotes(&drain(&mut sec)),
        "a restarted peer holds the mail"
    );
    assert_eq!(sec.role(), Role::Secondary);
    // Nor does it win a start-up election, whatever its priority.
    let mut neg = Core::new(cfg("mx1", "mx2", 200), EpochRecord::default(), t0);
    neg.handle_event(t0, Event::Replica(ReplicaFill::Filling));
    neg.handle_event(t0, hb_from_mx2(Role::Negotiating, 0, 1, 0));
    assert!(!promotes(&drain(&mut neg)));
    // No peer at start-up: it waits too.
    neg.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(neg.role(), Role::Negotiating);

    // The restarted former primary (mx2's view, as mx1 here with a low
    // priority): it hears a secondary whose replica is incomplete, and
    // promotes although the secondary would win an election.
    let mut former = Core::new(
        cfg("mx1", "mx2", 10),
        EpochRecord {
            epoch: 3,
            held_primary: Some(3),
        },
        t0,
    );
    drain(&mut former);
    former.handle_event(
        t0,
        hb_from_mx2(Role::Secondary, 3, 1, FLAG_REPLICA_INCOMPLETE),
    );
    let acts = drain(&mut former);
    assert!(promotes(&acts), "{acts:?}");
    // Without the flag it waits for the secondary to promote.
    let mut plain = Core::new(
        cfg("mx1", "mx2", 10),
        EpochRecord {
            epoch: 3,
            held_primary: Some(3),
        },
        t0,
    );
    drain(&mut plain);
    plain.handle_event(t0, hb_from_mx2(Role::Secondary, 3, 1, 0));
    assert!(!promotes(&drain(&mut plain)));
    // And in an election between two negotiating nodes the complete one
    // wins over a higher priority.
    let mut low = Core::new(cfg("mx1", "mx2", 10), EpochRecord::default(), t0);
    low.handle_event(t0, Event::Replica(ReplicaFill::Complete));
    drain(&mut low);
    low.handle_event(
        t0,
        hb_from_mx2(Role::Negotiating, 0, 1, FLAG_REPLICA_INCOMPLETE),
    );
    assert!(promotes(&drain(&mut low)));
}

#[test]
fn an_incomplete_replica_takes_over_in_a_switchover() {
    let t0 = Instant::now();
    let mut c = filling_secondary(t0);
    drain(&mut c);
    c.handle_event(
        t0 + Duration::from_millis(100),
        hb_from_mx2(Role::HandingOver, 2, 2, 0),
    );
    assert!(promotes(&drain(&mut c)), "the operator asked for it");
}

#[test]
fn a_fresh_node_does_not_take_over_from_an_incomplete_replica_but_a_complete_one_does() {
    let t0 = Instant::now();
    // mx1 restarted with no state at all (replaced): it hears the
    // incomplete secondary mx2, whose primary it was.
    let incomplete = |seq| hb_from_mx2(Role::Secondary, 2, seq, FLAG_REPLICA_INCOMPLETE);
    let mut fresh = Core::new(cfg("mx1", "mx2", 200), EpochRecord::default(), t0);
    drain(&mut fresh);
    fresh.handle_event(t0, incomplete(1));
    let acts = drain(&mut fresh);
    assert!(!promotes(&acts), "{acts:?}");
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Alarm(Alarm::FreshBesideIncomplete))));
    // Nor at the start-up wait's end (the peer heard all along), nor in an
    // election.
    let t1 = t0 + Duration::from_millis(1000);
    fresh.handle_event(
        t1,
        hb_from_mx2(Role::Negotiating, 2, 2, FLAG_REPLICA_INCOMPLETE),
    );
    fresh.handle_timeout(t1 + Duration::from_millis(50));
    assert!(!promotes(&drain(&mut fresh)));
    assert_eq!(fresh.role(), Role::Negotiating);
    // Its stores do hold the mail after all (`accept-replica --force`).
    fresh.handle_event(
        t1 + Duration::from_millis(100),
        Event::Replica(ReplicaFill::Complete),
    );
    assert!(promotes(&drain(&mut fresh)));

    // A node whose replica was complete takes over at once.
    let mut complete = Core::new(cfg("mx1", "mx2", 10), EpochRecord::default(), t0);
    complete.handle_event(t0, Event::Replica(ReplicaFill::Complete));
    drain(&mut complete);
    complete.handle_event(t0, incomplete(1));
    assert!(promotes(&drain(&mut complete)));
}

#[test]
fn a_promotion_waiting_for_the_quorum_grace_is_dropped_when_a_fill_begins() {
    let t0 = Instant::now();
    let grace = Duration::from_millis(600);
    let mut c = Core::new(
        CoreConfig {
            quorum: QuorumRule::Ping { grace },
            ..cfg("mx1", "mx2", 200)
        },
        EpochRecord {
            epoch: 2,
            held_primary: None,
        },
        t0,
    );
    c.handle_event(t0, Event::Quorum(true));
    c.handle_event(t0, hb_from_mx2(Role::Primary, 2, 1, 0));
    drain(&mut c);
    // The peer goes silent: a promotion waits for the grace.
    let lost = t0 + Duration::from_secs(1);
    c.handle_timeout(lost);
    assert!(!promotes(&drain(&mut c)));
    // The first sync session begins meanwhile (the sync path still up).
    c.handle_event(lost, Event::Replica(ReplicaFill::Filling));
    c.handle_timeout(lost + grace * 2);
    assert!(
        !promotes(&drain(&mut c)),
        "no promotion with part of the mail"
    );
    assert_eq!(c.role(), Role::Secondary);
}

/// mx1, primary at epoch 1 with switchovers prepared, hearing the
/// secondary mx2 (heartbeat `flags`: its replica incomplete or not).
fn primary_beside_secondary(t0: Instant, flags: u8) -> Core {
    let mut c = Core::new(
        CoreConfig {
            prepare_handover: Some(Duration::from_secs(30)),
            ..cfg("mx1", "mx2", 200)
        },
        EpochRecord::default(),
        t0,
    );
    c.handle_timeout(t0 + Duration::from_secs(2));
    c.handle_event(
        t0 + Duration::from_secs(2),
        Event::Persisted(EpochRecord {
            epoch: 1,
            held_primary: Some(1),
        }),
    );
    assert_eq!(c.role(), Role::Primary);
    c.handle_event(
        t0 + Duration::from_secs(2),
        hb_from_mx2(Role::Secondary, 1, 1, flags),
    );
    drain(&mut c);
    c
}

fn becomes(acts: &[Action], role: Role) -> bool {
    acts.iter()
        .any(|a| matches!(a, Action::Become { role: r, .. } if *r == role))
}

fn prepares(acts: &[Action]) -> bool {
    acts.iter().any(|a| matches!(a, Action::PrepareHandover))
}

/// A step-down under way waits while the peer's heartbeats say it fills,
/// and starts the switchover at the first that says it is complete.
fn waits_for_the_fill_then_prepares(c: &mut Core, t: Instant) {
    c.handle_event(
        t,
        hb_from_mx2(Role::Secondary, 1, 2, FLAG_REPLICA_INCOMPLETE),
    );
    assert!(!prepares(&drain(c)), "waits while the peer fills");
    assert_eq!(c.role(), Role::Primary);
    c.handle_event(t, hb_from_mx2(Role::Secondary, 1, 3, 0));
    assert!(prepares(&drain(c)), "prepares once the peer is complete");
}

#[test]
fn a_step_down_waits_for_the_peers_fill_then_hands_the_role_over_and_goes_off() {
    let t0 = Instant::now();
    // The peer was heard 100 ms before.
    let t1 = t0 + Duration::from_millis(2100);
    // The peer's replica is still filling, or its first sync has not begun
    // (the sync link down: a drain would time out, and this node's going
    // off would make the empty peer serve).
    for flags in [FLAG_REPLICA_INCOMPLETE, FLAG_REPLICA_FRESH] {
        let mut c = primary_beside_secondary(t0, flags);
        c.step_down(t1, "on_primary hook failed".into()).unwrap();
        let acts = drain(&mut c);
        // This node stays primary (the fill goes on) and says why.
        assert!(!prepares(&acts), "{acts:?}");
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Alarm(Alarm::StepDownWaitsForFill(_)))),
            "{acts:?}"
        );
        assert_eq!(c.role(), Role::Primary);
        let t2 = t1 + Duration::from_millis(100);
        waits_for_the_fill_then_prepares(&mut c, t2);
        c.handle_event(t2, Event::HandoverPrepared);
        assert!(becomes(&drain(&mut c), Role::HandingOver));
        // The peer promotes; this node goes off, not secondary.
        c.handle_event(t2, hb_from_mx2(Role::Primary, 2, 4, 0));
        let acts = drain(&mut c);
        assert_eq!(c.role(), Role::Off, "{acts:?}");
        assert_eq!(c.epoch(), 2);
        assert!(!acts
            .iter()
            .any(|a| matches!(a, Action::StartQueuePush { .. })));
    }

    // Waiting for the fill, the peer is lost for a while: the node waits
    // on (the peer would not take over from an `off` node, and only this
    // node can go on filling it), and hands over once the peer is back
    // and complete.
    let mut c = primary_beside_secondary(t0, FLAG_REPLICA_INCOMPLETE);
    c.step_down(t1, "on_primary hook failed".into()).unwrap();
    drain(&mut c);
    let t3 = t1 + Duration::from_secs(5);
    c.handle_timeout(t3);
    assert_eq!(c.role(), Role::Primary);
    waits_for_the_fill_then_prepares(&mut c, t3);
}

#[test]
fn a_node_whose_stores_never_held_the_mail_says_so() {
    let t0 = Instant::now();
    let mut fresh = Core::new(cfg("mx1", "mx2", 10), EpochRecord::default(), t0);
    let flags = drain(&mut fresh).iter().find_map(|a| match a {
        Action::SendHeartbeat(hb) => Some(hb.flags),
        _ => None,
    });
    assert_eq!(
        flags.map(|f| f & FLAG_REPLICA_FRESH),
        Some(FLAG_REPLICA_FRESH)
    );
}

#[test]
fn a_step_down_beside_a_complete_secondary_hands_over_at_once_and_goes_off_if_that_fails() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(2100);
    let mut c = primary_beside_secondary(t0, 0);
    c.step_down(t1, "on_primary hook failed".into()).unwrap();
    assert!(prepares(&drain(&mut c)));
    // A preparation that fails: off at once, not serving again.
    c.handle_event(t1, Event::HandoverPrepareFailed("drain failed".into()));
    let acts = drain(&mut c);
    assert_eq!(c.role(), Role::Off);
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::ResumeService { .. })));
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Alarm(Alarm::StepDownHandoverFailed(_)))));

    // The peer began its fill after the preparation started (it had not
    // said so yet), and the drain ran out of time: the node waits for the
    // fill instead of leaving nobody to serve.
    let mut c = primary_beside_secondary(t0, 0);
    c.step_down(t1, "on_primary hook failed".into()).unwrap();
    assert!(prepares(&drain(&mut c)));
    c.handle_event(
        t1,
        hb_from_mx2(Role::Secondary, 1, 2, FLAG_REPLICA_INCOMPLETE),
    );
    c.handle_event(
        t1,
        Event::HandoverPrepareFailed("drain took too long".into()),
    );
    assert_eq!(c.role(), Role::Primary);
    c.handle_event(t1, hb_from_mx2(Role::Secondary, 1, 3, 0));
    assert!(prepares(&drain(&mut c)));

    // A peer that never takes the role: off once the handover times out.
    let mut c = primary_beside_secondary(t0, 0);
    c.step_down(t1, "on_primary hook failed".into()).unwrap();
    drain(&mut c);
    c.handle_event(t1, Event::HandoverPrepared);
    drain(&mut c);
    c.handle_timeout(t1 + Duration::from_secs(5));
    assert_eq!(c.role(), Role::Off);

    // Preparing beside a complete peer that is lost: off, for the peer to
    // take over when it is back.
    let mut c = primary_beside_secondary(t0, 0);
    c.step_down(t1, "on_primary hook failed".into()).unwrap();
    drain(&mut c);
    c.handle_timeout(t1 + Duration::from_secs(5));
    assert_eq!(c.role(), Role::Off);

    // No live peer: off at once, as before.
    let mut c = primary_beside_secondary(t0, 0);
    let silent = t0 + Duration::from_secs(10);
    c.handle_timeout(silent);
    drain(&mut c);
    c.step_down(silent, "on_primary hook failed".into())
        .unwrap();
    assert!(becomes(&drain(&mut c), Role::Off));
}

#[test]
fn a_step_down_ended_some_other_way_does_not_turn_a_later_switchover_into_one() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(2100);
    let mut c = primary_beside_secondary(t0, FLAG_REPLICA_INCOMPLETE);
    c.step_down(t1, "on_primary hook failed".into()).unwrap();
    drain(&mut c);
    // A failed self-check ends the tenure, and the step-down with it.
    c.handle_event(t1, Event::SelfCheck(Err("disk".into())));
    assert_eq!(c.role(), Role::Failed);
    assert!(c.off_after_handover.is_none());
    assert!(!c.step_down_waits);
}

fn heartbeat_from(node: &str, role: Role, epoch: u64, seq: u64) -> Heartbeat {
    Heartbeat {
        node: node.into(),
        role,
        epoch,
        seq,
        priority: 100,
        flags: 0,
    }
}

#[test]
fn a_peer_whose_epoch_rises_at_every_heartbeat_queues_one_adoption_write() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    drain(&mut core);
    let mut written = Vec::new();
    for (i, epoch) in (2..2000u64).step_by(2).enumerate() {
        let t = t0 + Duration::from_millis(10 * i as u64);
        core.handle_event(
            t,
            Event::Heartbeat(heartbeat_from("mx2", Role::Primary, epoch, i as u64)),
        );
        written.extend(drain(&mut core).iter().filter_map(|a| match a {
            Action::PersistEpoch(r) => Some(*r),
            _ => None,
        }));
    }
    assert_eq!(core.role(), Role::Secondary);
    assert_eq!(core.epoch(), 1998, "the epoch is adopted at once");
    assert_eq!(
        written.len(),
        1,
        "one write in flight, not one per heartbeat: {written:?}"
    );
    // Its answer lets the latest epoch go to the disk, once.
    core.handle_event(t0, Event::Persisted(written[0]));
    let next: Vec<_> = drain(&mut core)
        .iter()
        .filter_map(|a| match a {
            Action::PersistEpoch(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].epoch, 1998);
    core.handle_event(t0, Event::Persisted(next[0]));
    assert!(
        persisted(&drain(&mut core)).is_none(),
        "nothing more is owed"
    );
}

#[test]
fn a_primary_raises_one_epoch_at_a_time_over_a_peer_whose_epoch_keeps_rising() {
    let t0 = Instant::now();
    let mut core = Core::new(cfg("mx1", "mx2", 100), EpochRecord::default(), t0);
    core.handle_timeout(t0 + Duration::from_secs(1));
    let promotion = persisted(&drain(&mut core)).expect("a promotion record");
    core.handle_event(t0, Event::Persisted(promotion));
    assert_eq!(core.role(), Role::Primary);
    drain(&mut core);
    let mut raises = Vec::new();
    for (i, epoch) in (10..1010u64).step_by(2).enumerate() {
        let t = t0 + Duration::from_millis(1000 + 10 * i as u64);
        core.handle_event(
            t,
            Event::Heartbeat(heartbeat_from("mx2", Role::Secondary, epoch, i as u64)),
        );
        raises.extend(drain(&mut core).iter().filter_map(|a| match a {
            Action::PersistEpoch(r) => Some(*r),
            _ => None,
        }));
    }
    assert_eq!(
        raises.len(),
        1,
        "one raise in flight, not one per heartbeat"
    );
    assert_eq!(raises[0].held_primary, Some(raises[0].epoch));
    // Once it lands, the next heartbeat raises above the peer's latest.
    core.handle_event(t0, Event::Persisted(raises[0]));
    assert_eq!(core.role(), Role::Primary);
    assert_eq!(core.epoch(), raises[0].epoch);
    drain(&mut core);
    core.handle_event(
        t0 + Duration::from_secs(20),
        Event::Heartbeat(heartbeat_from("mx2", Role::Secondary, 1008, 5000)),
    );
    let again = persisted(&drain(&mut core)).expect("a raise above the latest");
    assert!(
        again.epoch > 1008 && again.held_primary == Some(again.epoch),
        "{again:?}"
    );
}
